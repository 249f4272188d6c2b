"""NAS-Arch: ENAS's joint (operator + skip) macro search on CIFAR-10 (the paper's baseline).

A 12-layer ENAS macro space of 36 channels (pool layers 3 and 7), every layer choosing
one of the six operators and any skip connections to earlier layers; the controller
samples skips with its attention and learns with ENAS's KL skip penalty (target 0.4,
weight 0.8); ENAS's macro-search recipe (310 epochs, 50 controller updates of 20
architectures per epoch, child SGD cosine 0.05 -> 5e-4 with restarts, L2 2.5e-4).
The derived architecture (``arch.json``) is NAS-Arch; it is retrained wider (96
channels) and the report shows it layer by layer with its skip sources. Every
controller update logs the Figure-1 diagnostics (``python -m nar_jax.plots``).

Variants: none (CIFAR-10, GPU) and ``smoke`` (mnist5k, 6 layers of 8 channels, a
couple of epochs: minutes on a CPU).

  python -m nar_jax.main --config=configs/cifar_nasarch.py \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --workdir=runs/nasarch
  python -m nar_jax.plots --workdir=runs/nasarch
"""

from nar_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.dataset.name = 'cifar10'
  c.model.base = 'enas_macro'
  c.model.num_layers = 12
  c.model.channels = 36
  c.model.retrain_channels = 96
  c.search.epochs = 310
  # README, "Controller variants": fastest on a planted per-layer op target (joint policy).
  c.search.controller.kind = 'node_aware'
  c.search.controller.lr = 0.02
  c.search.controller.baseline_decay = 0.9
  c.retrain.epochs = 310
  c.retrain.baseline = False        # the joint space's "baseline" chain is no reference network
  if arg == 'smoke':
    smoke(c)
  elif arg not in (None, ''):
    raise ValueError(f"unknown variant {arg!r}; use 'smoke' or none")
  return c


def smoke(c):
  """Shrinks ``c`` in place to an offline CPU run of a few minutes on mnist5k."""
  c.dataset.name = 'mnist5k'
  c.dataset.crop_padding = 2
  c.dataset.flip = False
  c.model.num_layers = 6
  c.model.channels = 8
  c.model.retrain_channels = 8
  c.child.batch_size = 64
  c.child.optimizer.t0_epochs = 4
  c.search.epochs = 3
  c.search.controller.updates_per_epoch = 10
  c.search.controller.num_aggregate = 10
  c.search.controller.valid_batch_size = 100
  c.derive.num_samples = 5
  c.retrain.epochs = 2
  c.retrain.batch_size = 64
  c.retrain.optimizer.lr_max = 0.05
  c.retrain.optimizer.t0_epochs = 2
  c.eval_batch_size = 500
  c.log_every_steps = 20
