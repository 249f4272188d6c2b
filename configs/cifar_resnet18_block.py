"""The paper's ResNet-18-8 refinement on CIFAR-10: a node per residual body (8 nodes).

Choosing op ``o`` for a node sets its body to ``o -> BN -> ReLU -> o -> BN``.
Otherwise as ``cifar_resnet18.py`` (variant ``:pretrain`` adds 10 random epochs).

  python -m nar_jax.main --config=configs/cifar_resnet18_block.py \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --workdir=runs/cifar_resnet18_block
"""

from nar_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.dataset.name = 'cifar10'
  c.model.base = 'resnet18'
  c.model.granularity = 'block'
  c.search.epochs = 150
  c.retrain.epochs = 200
  if arg == 'pretrain':
    c.pretrain.epochs = 10
  elif arg not in (None, ''):
    raise ValueError(f"unknown variant {arg!r}; use 'pretrain' or none")
  return c
