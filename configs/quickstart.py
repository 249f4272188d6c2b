"""Quickstart: refine a narrow ResNet-18-16 on the embedded mnist5k digits, offline, on CPU.

The whole pipeline (pretrain, search, derive, retrain of the refined and the
baseline network, report) runs in a few minutes on 2 CPU cores, and the search
finds something at that scale (README, "Quickstart results"):

* the search starts near the base network (``search.controller.original_prob``:
  each node keeps its original conv3x3 with probability 0.5 under the untrained
  policy), where shared weights learn as fast as a plain network, and pretrains the
  shared weights there for two epochs (README, "Shared weights that learn");
* the reward is MnasNet's hard resource constraint at 70% of the base network's
  MACs (accuracy, scaled by target / MACs above the target), so the controller
  learns which convolutions can go;
* the controller learns at the pace its small budget needs (README, "Controller
  variants").

  python -m nar_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Variant ``random``: random search at the same budget (the same pretraining and search
epochs with architectures of the untrained policy, no controller updates; derive keeps the
best of 10 by the same cost-aware score), the control the search must beat.
"""

from nar_jax.config import base_config


def get_config(arg=None):
  if arg not in (None, '', 'random'):
    raise ValueError(f"unknown variant {arg!r}; use 'random' or none")
  c = base_config()
  c.dataset.name = 'mnist5k'
  c.dataset.crop_padding = 2
  c.dataset.flip = False          # digits are not mirror-symmetric
  c.model.width = 0.125           # 8-16-32-64 channels
  c.child.batch_size = 64
  c.child.optimizer.t0_epochs = 10
  c.pretrain.epochs = 2
  c.search.epochs = 8
  c.search.controller.updates_per_epoch = 10
  c.search.controller.num_aggregate = 10
  c.search.controller.valid_batch_size = 100
  # The node-aware controller finds a planted per-node target in its 80 updates; ENAS's
  # does not (README, "Controller variants").
  c.search.controller.kind = 'node_aware'
  c.search.controller.lr = 0.02
  c.search.controller.baseline_decay = 0.9
  c.search.controller.original_prob = 0.5
  c.search.cost.target_macs = 0.7
  c.search.cost.weight = -1.0
  c.search.cost.weight_below = 0.0
  c.derive.num_samples = 10
  c.retrain.epochs = 6
  c.retrain.batch_size = 64
  c.retrain.optimizer.lr_max = 0.05
  c.retrain.optimizer.t0_epochs = 6
  c.eval_batch_size = 500
  c.log_every_steps = 20
  if arg == 'random':
    c.search.method = 'random'
  return c
