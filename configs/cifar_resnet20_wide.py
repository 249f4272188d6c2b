"""The paper's Table 1 baseline: ResNet-20 with 64/128/256 channels, retrained on CIFAR-10.

No search: ``config.arch = 'baseline'`` trains the base network itself with the
retraining recipe and reports its test accuracy, parameters and MACs.

  python -m nar_jax.main --config=configs/cifar_resnet20_wide.py \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --workdir=runs/resnet20_wide
"""

from nar_jax.config import base_config


def get_config(arg=None):
  if arg:
    raise ValueError(f"unknown variant {arg!r}; this config has none")
  c = base_config()
  c.dataset.name = 'cifar10'
  c.model.base = 'resnet20_wide'
  c.model.granularity = 'conv'
  c.arch = 'baseline'
  c.retrain.epochs = 200
  return c
