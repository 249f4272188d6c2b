"""The paper's ResNet-18-16 refinement on CIFAR-10 (Tables 5 and 6), for a GPU.

A node per 3x3 conv (16 nodes), candidates by the paper's rule (no more parameters
than conv3x3: conv3x3, sep3x3, sep5x5, max3x3, avg3x3), ENAS's search recipe
(README, "Design notes": ENAS's controller and recipe). Variants:

  configs/cifar_resnet18.py            NAR ("R"): search without pretraining
  configs/cifar_resnet18.py:pretrain   NAR-PreTrain ("RP"): 10 epochs of uniformly random
                                       architectures before the search

CIFAR-10 must be prepared once (README, "Preparing CIFAR-10"):

  python -m nar_jax.main --config=configs/cifar_resnet18.py \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --workdir=runs/cifar_resnet18
"""

from nar_jax.config import cifar_resnet18_config


def get_config(arg=None):
  return cifar_resnet18_config('conv', arg)
