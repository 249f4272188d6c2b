"""The paper's ResNet-18-8 refinement on CIFAR-10: a node per residual body (8 nodes).

Choosing op ``o`` for a node sets its body to ``o -> BN -> ReLU -> o -> BN``.
Otherwise as ``cifar_resnet18.py`` (variant ``:pretrain`` adds 10 random epochs).

  python -m nar_jax.main --config=configs/cifar_resnet18_block.py \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --workdir=runs/cifar_resnet18_block
"""

from nar_jax.config import cifar_resnet18_config


def get_config(arg=None):
  return cifar_resnet18_config('block', arg)
