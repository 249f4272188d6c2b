"""The configuration schema shared by every file in ``configs/``, and its validation.

Config files are code: each defines ``get_config(arg=None)``, starts from
:func:`base_config` and overrides what its experiment needs; ``file.py:variant``
passes ``variant`` as ``arg``. Every field can be overridden from the command line,
e.g. ``--config.search.epochs=3``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import ml_collections

from nar_jax import families, ops, tasks
from nar_jax.models import heads

SEARCH_METHODS = ('controller', 'alternating', 'random')
DATASETS = ('cifar10', 'mnist5k', 'synthetic', 'faces', 'synthetic_faces', 'imagenet2012')
CONTROLLER_KINDS = ('enas', 'node_aware')
"""``search.controller.kind``: the keys of :data:`nar_jax.controller.VARIANTS`."""


def sgd_config(lr_max: float, lr_min: float, t0_epochs: float, t_mul: float,
               weight_decay: float, momentum: float = 0.9, nesterov: bool = True,
               schedule: str = 'cosine', decay_epochs: str = '', decay_factor: float = 0.1):
  """SGD with momentum, L2 weight decay and a learning-rate schedule counted in epochs.

  ``schedule='cosine'``: SGDR (cosine from ``lr_max`` to ``lr_min`` over ``t0_epochs``,
  restarts with periods growing by ``t_mul``). ``schedule='step'``: ``lr_max`` times
  ``decay_factor`` after each epoch listed in ``decay_epochs`` (comma-separated,
  ArcFace's recipe). A config may add ``warmup_epochs`` (a float) to the returned dict:
  a linear warm-up over that many epochs (:func:`nar_jax.train.linear_warmup`;
  ``configs/imagenet_resnet18.py``); it is not a default field, so other configs'
  ``config.json`` are unchanged.
  """
  return ml_collections.ConfigDict(dict(
      lr_max=lr_max, lr_min=lr_min, t0_epochs=t0_epochs, t_mul=t_mul, momentum=momentum,
      nesterov=nesterov, weight_decay=weight_decay, schedule=schedule,
      decay_epochs=decay_epochs, decay_factor=decay_factor))


def enas_controller() -> ml_collections.ConfigDict:
  """ENAS's controller, exactly: ``kind='enas'`` (:mod:`nar_jax.controller`), a 64-unit
  LSTM with weights uniform in +-0.1, logits ``1.5 tanh(.)``, Adam (lr 1e-3, beta1 0,
  eps 1e-3) on REINFORCE with an EMA baseline (decay 0.99) over 20 architectures per
  update, entropy bonus weight 1e-4."""
  return ml_collections.ConfigDict(dict(
      kind='enas', hidden=64, init_range=0.1, tanh_constant=1.5, entropy_weight=1e-4,
      baseline_decay=0.99, lr=1e-3, beta1=0.0, eps=1e-3,
      num_aggregate=20,        # architectures per controller update
  ))


def search_controller(settings: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.search.controller``: the controller ``settings`` (:func:`enas_controller`'s
  fields) plus the search's schedule, reward batch and skip penalty."""
  c = ml_collections.ConfigDict(settings)
  c.update(dict(
      updates_per_epoch=50,
      valid_batch_size=128,    # one validation minibatch rewards each architecture
      # Joint ('enas_macro') searches: ENAS's KL skip penalty toward skip_target,
      # weighted skip_weight in the controller loss.
      skip_target=0.4, skip_weight=0.8,
      # Operator searches: the probability the untrained policy gives each node's
      # original operator (the base network), the rest spread evenly over the other
      # candidates; 0 (or at most 1/K): ENAS's near-uniform start. It is the
      # distribution pretraining and random search sample from, and the controller's
      # start (controller.original_prior). README, "Shared weights that learn".
      original_prob=0.0,
  ))
  return c


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the paper's ResNet-18-16 refinement on CIFAR-10 with ENAS's recipe."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_devices = 0            # 0: every local device; the data mesh spans them.

  c.dataset = ml_collections.ConfigDict(dict(
      # 'cifar10' | 'mnist5k' | 'synthetic' | 'faces' (insightface files in data_dir) |
      # 'synthetic_faces' (written into data_dir, or <workdir>/data, on first use) |
      # 'imagenet2012' (TFDS data_dir; configs/imagenet_resnet18.py adds its fields)
      name='cifar10',
      data_dir='',               # cifar10: TFDS data_dir ('' = TFDS default); faces: the
                                 # directory with train.rec, train.idx, property, *.bin
      valid_size=-1,             # -1: the dataset's default (5,000 for CIFAR-10, as ENAS)
      crop_padding=4,            # on-device pad-and-random-crop
      flip=True,                 # on-device random horizontal flip
      # Faces only.
      verification='',           # comma-separated .bin names in data_dir: 'lfw,cfp_fp,agedb_30'
      proxy=ml_collections.ConfigDict(dict(  # the search's proxy task (paper section 4.1.1)
          num_identities=4000, images_per_identity=40, valid_per_identity=4)),
      synthetic=ml_collections.ConfigDict(dict(  # 'synthetic_faces' only
          num_identities=40, images_per_identity=20, image_size=112, num_pairs=200,
          verification_identities=10)),
  ))

  c.model = ml_collections.ConfigDict(dict(
      # 'resnet18' | 'resnet20_wide' | 'ir18' | 'ir34' | 'ir50' | 'ir100' | 'enas_macro'
      # (ENAS's macro space, operators *and* skips: the NAS-Arch baseline; see
      # nar_jax.joint). width, granularity and candidate_rule do not apply to it.
      base='resnet18',
      granularity='conv',        # 'conv': ResNet-18-16 | 'block': ResNet-18-8
      width=1.0,                 # channel multiplier
      candidate_rule='paper',    # 'paper': no more parameters than the original | 'all'
      ops='',                    # comma-separated op names restricting the candidates
      dtype='float32',
      # The supernet's operator choice (nar_jax.ops.Choice): 'switch' (an XLA conditional
      # per node), 'select' (no conditional: one superkernel per node), or '' for the
      # platform's default (ops.default_choice: 'switch' on CPU, measured; 'select' on
      # accelerators, unmeasured).
      choice='',
      # 'enas_macro' only: layers, first-stage channels of the search (ENAS: 12, 36) and
      # of the retrained fixed network (0: the same), which doubles its channels at each
      # pool layer when retrain_widen is set (ENAS's fixed-architecture networks).
      num_layers=12,
      channels=36,
      retrain_channels=0,
      retrain_widen=False,
      # Softmax-family bases (resnet*, enas_macro) on a face dataset: 'softmax' classifies
      # the identities (no verification); 'face' trains them as face networks like the IR
      # bases (ArcFace "E" embedding + margin head, verification on dataset.verification).
      # IR bases always have the face head.
      head='softmax',
      embedding_size=512,        # features of the face embedding (face head, IR bases)
      # A network of your own: the Python file (or module name) whose import registers
      # the family of model.base (nar_jax.families.register; README, "Refining your own
      # network"). Stored in config.json, so later commands find the family again.
      family_module='',
  ))

  # Face networks (IR bases, model.head='face'): the margin of the target logit,
  # s * (cos(m1 theta + m2) - m3). ArcFace: (64, 1, 0.5, 0); CosFace: (64, 1, 0, 0.35).
  # Unused by softmax heads.
  c.margin = ml_collections.ConfigDict(dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0))

  # Shared-weight (child) training, used by pretraining and search alike.
  c.child = ml_collections.ConfigDict(dict(
      batch_size=128,
      optimizer=sgd_config(lr_max=0.05, lr_min=5e-4, t0_epochs=10, t_mul=2, weight_decay=2.5e-4),
  ))

  c.pretrain = ml_collections.ConfigDict(dict(epochs=0))  # the paper's "PreTrain" variant: > 0

  c.search = ml_collections.ConfigDict(dict(
      epochs=150,
      # Score architectures (controller rewards, derive) with each batch's own BN
      # statistics rather than the shared running averages; see train.predict.
      batch_statistics=True,
      # Controller reward: 'accuracy' on validation minibatches, or (faces) 'verification':
      # the 10-fold verification accuracy of valid_batch_size / 2 pairs drawn from the
      # held-out pair set reward_pairs (a .bin name in dataset.data_dir).
      reward='accuracy',
      reward_pairs='',
      controller=search_controller(enas_controller()),
      # MnasNet's resource constraint: reward = accuracy * (MACs / target) ** w
      # (reinforce.cost_aware_reward), also the score derive ranks by; w = weight above
      # the target and weight_below at or below it (MnasNet's soft constraint: both
      # -0.07; its hard constraint: weight=-1, weight_below=0). target_macs: 0 = accuracy
      # alone (NAR's reward); in (0, 1]: that fraction of the base network's MACs; > 1:
      # absolute MACs.
      cost=ml_collections.ConfigDict(dict(target_macs=0.0, weight=-0.07, weight_below=-0.07)),
      # 'controller': ENAS/NAR search (epochs of child training + controller updates,
      # then derive). 'alternating' ('enas_macro' only, eq. 9-11 of the paper): from the
      # baseline architecture, alternately search operators with the skips fixed and
      # skips with the operators fixed (nar_jax.alternating). 'random': the control every
      # NAS result must beat: the same child epochs with architectures from the untrained
      # policy (uniform, or controller.original_prob's start), no controller updates, then
      # derive keeps the best of derive.num_samples such architectures.
      method='controller',
      # Architectures the shared weights train per search step (every search method):
      # the devices form archs_per_step groups of consecutive devices (their count must
      # divide by it), each samples its own architecture and trains it on its share of
      # the global batch (nar_jax.train.make_train_step; README, "Design notes"). 1:
      # one architecture per step on every device. Pretraining samples one per step.
      archs_per_step=1,
  ))

  # The alternating search (search.method='alternating'): each phase runs
  # epochs_per_phase search epochs, then picks the best of the incumbent, the
  # controller's most likely and num_samples sampled architectures on the validation
  # split; a phase "improves" when its pick beats the incumbent by more than tolerance.
  # It stops when an operator phase and a skip phase in a row did not improve, or
  # after max_rounds rounds (one round = an operator phase and a skip phase).
  c.alternating = ml_collections.ConfigDict(dict(
      max_rounds=3, tolerance=0.0, epochs_per_phase=10, num_samples=10))

  c.derive = ml_collections.ConfigDict(dict(num_samples=10))

  c.retrain = ml_collections.ConfigDict(dict(
      epochs=200,
      batch_size=128,
      optimizer=sgd_config(lr_max=0.1, lr_min=0.0, t0_epochs=200, t_mul=1, weight_decay=5e-4),
      baseline=True,             # also retrain the base network with the same recipe
      # Faces: 'full' retrains on every identity of train.rec (the paper); 'proxy' on the
      # search's proxy task.
      data='full',
      verify_every_epochs=0,     # faces: also verify during retraining (0: only at the end)
  ))

  # Skip pretrain/search/derive and retrain this architecture: '' (search),
  # 'baseline', or comma-separated op names, one per node.
  c.arch = ''

  c.eval_batch_size = 500
  c.log_every_steps = 50
  # Run each training epoch (pretrain, search, retrain) as one jitted lax.scan over the
  # epoch's batches put on the devices at once: no host round trip between steps, but
  # progress is logged once per epoch and the epoch's images must fit in device memory.
  c.scan_epoch = False
  # A deliberate continuation of a workdir under changed fields: comma-separated field
  # names or sections (e.g. 'retrain.epochs') that may differ from <workdir>/config.json;
  # the phases that use them are recomputed (nar_jax.workdir, README "Reliability").
  c.allow_changes = ''
  return c


def cifar_resnet18_config(granularity: str, variant: str | None) -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 refinement of ResNet-18 at ``granularity`` (Tables 5 and 6).

  ``variant``: ``None`` for NAR ("R"), ``'pretrain'`` for NAR-PreTrain ("RP": 10 epochs
  of uniformly random architectures before the search).
  """
  c = base_config()
  c.dataset.name = 'cifar10'
  c.model.base = 'resnet18'
  c.model.granularity = granularity
  c.search.epochs = 150
  c.retrain.epochs = 200
  # README, "Controller variants": fastest on a planted per-node target at 20 per update.
  c.search.controller.kind = 'node_aware'
  c.search.controller.lr = 0.01
  c.search.controller.baseline_decay = 0.9
  # A GPU config: on an H200 the step loop cost 1.71x the bare supernet step, the scan
  # epoch 0.58x (README, "Performance"); an epoch's 45,000 uint8 images take 138 MB.
  c.scan_epoch = True
  if variant == 'pretrain':
    c.pretrain.epochs = 10
  elif variant not in (None, ''):
    raise ValueError(f"unknown variant {variant!r}; use 'pretrain' or none")
  return c


def field(config: ml_collections.ConfigDict, dotted: str):
  """The value of a dotted field name, e.g. ``field(c, 'child.batch_size')``."""
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the first field that cannot work."""

  for name in ('child.batch_size', 'retrain.batch_size', 'eval_batch_size', 'log_every_steps',
               'search.controller.num_aggregate', 'search.controller.valid_batch_size',
               'derive.num_samples', 'model.width'):
    if field(config, name) <= 0:
      raise ValueError(f'config.{name} must be positive, got {field(config, name)}')
  for name in ('pretrain.epochs', 'search.epochs', 'retrain.epochs',
               'search.controller.updates_per_epoch'):
    if field(config, name) < 0:
      raise ValueError(f'config.{name} must be >= 0, got {field(config, name)}')
  if config.dataset.name not in DATASETS:
    raise ValueError(f'config.dataset.name must be one of {", ".join(DATASETS)}, '
                     f'got {config.dataset.name!r}')
  if config.model.head not in heads.HEADS:
    raise ValueError(f"config.model.head must be 'softmax' or 'face', got {config.model.head!r}")
  if config.model.embedding_size <= 0:
    raise ValueError(f'config.model.embedding_size must be positive, '
                     f'got {config.model.embedding_size}')
  if config.search.reward not in ('accuracy', 'verification'):
    raise ValueError(f"config.search.reward must be 'accuracy' or 'verification', "
                     f'got {config.search.reward!r}')
  if config.retrain.data not in ('full', 'proxy'):
    raise ValueError(f"config.retrain.data must be 'full' or 'proxy', got {config.retrain.data!r}")
  if config.model.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.model.dtype must be 'float32' or 'bfloat16', got {config.model.dtype!r}")
  if config.model.choice not in ('',) + ops.CHOICES:
    raise ValueError(f"config.model.choice must be '' (the platform's default) or one of "
                     f"{', '.join(ops.CHOICES)}, got {config.model.choice!r}")
  for op in families.restricted_ops(config) or ():
    ops.check_op_name(op)
  c = config.search.controller
  if c.kind not in CONTROLLER_KINDS:
    raise ValueError(f'config.search.controller.kind must be one of '
                     f'{", ".join(CONTROLLER_KINDS)}, got {c.kind!r}')
  for name in ('lr', 'eps', 'hidden', 'tanh_constant'):
    if c[name] <= 0:
      raise ValueError(f'config.search.controller.{name} must be positive, got {c[name]}')
  for name in ('beta1', 'baseline_decay'):
    if not 0 <= c[name] < 1:
      raise ValueError(f'config.search.controller.{name} must be in [0, 1), got {c[name]}')
  if config.search.method not in SEARCH_METHODS:
    raise ValueError(f'config.search.method must be one of {", ".join(SEARCH_METHODS)}, '
                     f'got {config.search.method!r}')
  if not isinstance(config.search.archs_per_step, int) or config.search.archs_per_step < 1:
    raise ValueError(f'config.search.archs_per_step must be a positive integer (a divisor of '
                     f'the device count), got {config.search.archs_per_step!r}')
  if config.search.cost.target_macs < 0:
    raise ValueError(f'config.search.cost.target_macs must be >= 0 (0: accuracy alone), '
                     f'got {config.search.cost.target_macs}')
  if not 0.0 <= config.search.controller.original_prob < 1.0:
    raise ValueError(f'config.search.controller.original_prob must be in [0, 1), '
                     f'got {config.search.controller.original_prob}')
  family = families.family_for(config)
  family.check_config(config)
  if config.search.method not in family.searches:
    able = families.bases_searching_with(config.search.method)
    needs = f'config.model.base={able[0]!r}' if len(able) == 1 else f'a base among {able}'
    raise ValueError(f'config.search.method={config.search.method!r} does not apply to '
                     f'config.model.base={config.model.base!r} (its family searches with '
                     f'{", ".join(family.searches)}): it needs {needs}')
  tasks.task_for(config, family).check_config(config, family)
  if config.search.method == 'alternating' and config.search.cost.target_macs:
    raise ValueError('config.search.cost applies to controller and random searches; the '
                     'alternating search ranks by accuracy: set config.search.cost.target_macs=0')
  if config.search.method == 'alternating':
    a = config.alternating
    for name in ('max_rounds', 'epochs_per_phase', 'num_samples'):
      if a[name] <= 0:
        raise ValueError(f'config.alternating.{name} must be positive, got {a[name]}')
    if a.tolerance < 0:
      raise ValueError(f'config.alternating.tolerance must be >= 0, got {a.tolerance}')


def verification_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The ``.bin`` names of ``config.dataset.verification``."""
  return tuple(n.strip() for n in config.dataset.verification.split(',') if n.strip())


# ---------------------------------------------------------------------------------------
# Finding and loading config files.
# ---------------------------------------------------------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def expand_path(path: str) -> str:
  """`path` with ``~`` expanded, made absolute (relative to the current directory);
  ``''`` stays ``''`` (the field's "not given"). For every path a config or flag takes:
  the shell does not expand ``~`` after ``=`` (``--config.dataset.data_dir=~/data``)."""
  return os.path.abspath(os.path.expanduser(os.fspath(path))) if path else path


def packaged_configs_dir() -> str | None:
  """The directory of the experiment configs that came with this copy of ``nar_jax``.

  ``<site-packages>/nar_jax/configs`` for an installed package (``pip install .`` copies
  the repository's top-level ``configs/`` there), the repository's ``configs/`` when
  running from a checkout; None if neither exists.
  """
  for directory in (os.path.join(_PACKAGE_DIR, 'configs'),
                    os.path.join(os.path.dirname(_PACKAGE_DIR), 'configs')):
    if os.path.isfile(os.path.join(directory, 'quickstart.py')):
      return directory
  return None


def resolve_config_file(spec: str) -> str:
  """``PATH[:VARIANT]`` with ``~`` expanded and ``PATH`` found.

  ``PATH`` is taken as given when that file exists (relative to the current directory);
  otherwise ``configs/NAME.py`` (or just ``NAME.py``) falls back to the configs that came
  with the package (:func:`packaged_configs_dir`), so ``--config=configs/quickstart.py``
  works from any directory after ``pip install``. Anything else is returned unchanged
  (with ``~`` expanded) for the config loader to report.
  """
  path, sep, variant = spec.partition(':')
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    packaged = packaged_configs_dir()
    parent, name = os.path.split(os.path.normpath(path))
    if packaged and name.endswith('.py') and parent in ('', 'configs'):
      candidate = os.path.join(packaged, name)
      if os.path.isfile(candidate):
        path = candidate
  return path + sep + variant


def resolve_config_argv(argv: Sequence[str]) -> list[str]:
  """Command-line arguments with the value of ``--config`` passed through
  :func:`resolve_config_file` (forms ``--config=SPEC`` and ``--config SPEC``); every other
  argument unchanged (``--config.x=...`` overrides included)."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config='):
      out[i] = '--config=' + resolve_config_file(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(out):
      out[i + 1] = resolve_config_file(out[i + 1])
  return out


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of ``PATH[:VARIANT]`` (found by :func:`resolve_config_file`), as the
  command line loads it: the file's ``get_config(VARIANT)`` (``None`` without a variant).

  For notebooks and scripts: ``load_config_file('configs/quickstart.py')``.
  """
  resolved = resolve_config_file(spec)
  path, _, variant = resolved.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config file {spec!r} not found (looked for {path!r}; the packaged '
                     f'configs are in {packaged_configs_dir()!r})')
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)
