"""The NAR pipeline: pretrain -> search -> derive -> retrain -> report.

Each phase checkpoints its own state (:mod:`nar_jax.checkpoint`) and records its
result in ``<workdir>/results/<phase>.json`` when it finishes, so running the same
command again continues an interrupted phase from its last checkpoint and skips
finished ones. All randomness is derived from ``config.seed`` and the (phase,
epoch, step) position, so a resumed run computes what an uninterrupted run computes.

Outputs in the workdir: ``config.json``, ``arch.json``, ``metrics.jsonl``, ``report.md``,
``report.json``, ``checkpoints/``, ``results/``, ``tensorboard/`` (the records of
``metrics.jsonl``, the config and the report as TensorBoard events: :mod:`nar_jax.tensorboard`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nar_jax import alternating
from nar_jax import config as config_lib
from nar_jax import controller as controller_lib
from nar_jax import counting, data, margins, ops, reinforce, report, train, verification
from nar_jax import policy as policy_lib
from nar_jax import tensorboard
from nar_jax import workdir as workdir_lib
from nar_jax.workdir import CONFIG_FILE, write_config  # noqa: F401  (the workdir's config.json)
from nar_jax.checkpoint import PhaseCheckpoints
from nar_jax.data import faces, synthetic_faces
from nar_jax.joint import JointSpace, joint_space
from nar_jax.models import macro, resnet
from nar_jax.models.iresnet import IResNet
from nar_jax.models.macro import MacroNet
from nar_jax.models.resnet import ResNet
from nar_jax.space import SearchSpace, ir_space, resnet_space

_PHASE_KEYS = {'init': 0, 'pretrain': 1, 'search': 2, 'derive': 3, 'retrain_baseline': 4,
               'retrain_refined': 5, 'controller': 6, 'evaluate_random': 7, 'retrain_random': 8}
_INDEXED_PHASES = ('retrain_random',)
"""Phase families ``<family>_<i>`` (e.g. ``retrain_random_03``, the search evaluation's
i-th random architecture): each member's key is the family's key folded with ``i``."""

# ---------------------------------------------------------------------------------------
# Logging.
# ---------------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Log:
  """Progress lines on stdout and one JSON object per line in ``metrics.jsonl``, also
  written as TensorBoard events to ``<workdir>/tensorboard/`` (opened at the first record
  or text; :meth:`close` closes it)."""

  def __init__(self, workdir: str, verbose: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.verbose = verbose
    self.start = time.time()
    self._tensorboard = None

  @property
  def tensorboard(self) -> tensorboard.Writer:
    if self._tensorboard is None:  # Counts on from the records of an earlier run.
      self._tensorboard = tensorboard.Writer(
          os.path.join(os.path.dirname(self.path), 'tensorboard'),
          history=tensorboard.read_records(self.path))
    return self._tensorboard

  def text(self, tag: str, text: str) -> None:
    self.tensorboard.text(tag, text)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def info(self, message: str) -> None:
    if self.verbose:
      print(f'[{_clock(time.time() - self.start)}] {message}', flush=True)

  def record(self, **fields: Any) -> None:
    fields = {k: np.asarray(v).tolist() if isinstance(v, (np.ndarray, np.generic, jax.Array)) else v
              for k, v in fields.items()}
    writer = self.tensorboard  # Before the line is appended: it replays the earlier ones.
    with open(self.path, 'a') as f:
      f.write(json.dumps(fields) + '\n')
    writer.record(fields)


class Progress:
  """Phase progress: step, running loss/accuracy, s/step, elapsed and estimated time left.

  The estimate extrapolates the pace measured since the first update, so the first
  step's compilation does not inflate it.
  """

  def __init__(self, log: Log, phase: str, total_steps: int, done_steps: int = 0):
    self.log, self.phase, self.total = log, phase, total_steps
    self.done = done_steps
    self.start = time.time()
    self.first_update = None  # (time, steps done) at the first update

  def update(self, steps: int, message: str) -> None:
    self.done += steps
    now = time.time()
    if self.first_update is None:
      self.first_update = (now, self.done)
      eta = '?'
    else:
      pace = (now - self.first_update[0]) / max(self.done - self.first_update[1], 1)
      eta = _clock(pace * (self.total - self.done))
    self.log.info(f'[{self.phase}] {message} | elapsed {_clock(now - self.start)} eta {eta}')


# ---------------------------------------------------------------------------------------
# The experiment: everything the phases share.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  workdir: str
  splits: data.Splits
  space: SearchSpace | JointSpace
  mesh: Any
  log: Log
  root_key: jax.Array

  @property
  def dtype(self):
    return jnp.bfloat16 if self.config.model.dtype == 'bfloat16' else jnp.float32

  @property
  def choice(self) -> str:
    """The supernet's operator choice: ``config.model.choice``, or the platform's default
    (:func:`nar_jax.ops.default_choice`) when it is ``''``."""
    return self.config.model.choice or ops.default_choice(jax.devices()[0].platform)

  @property
  def mask(self) -> np.ndarray:
    return self.space.candidate_mask()

  def key(self, phase: str) -> jax.Array:
    """The RNG key of ``phase``: a name of ``_PHASE_KEYS``, or ``<family>_<i>`` of an
    indexed family (``_INDEXED_PHASES``)."""
    family, _, index = phase.rpartition('_')
    if family in _INDEXED_PHASES and index.isdigit():
      return jax.random.fold_in(jax.random.fold_in(self.root_key, _PHASE_KEYS[family]),
                                int(index))
    return jax.random.fold_in(self.root_key, _PHASE_KEYS[phase])

  @property
  def faces(self) -> bool:
    """Whether the networks are face networks (margin head, verification): IR, or a
    softmax-family base with ``model.head='face'``."""
    return config_lib.is_face_network(self.config)

  @property
  def face_head_kwargs(self) -> dict[str, Any]:
    """The head attributes of a ``ResNet`` / ``MacroNet`` (``model.head``, the margin and
    ``model.embedding_size``)."""
    m = self.config.margin
    return dict(head=self.config.model.head, margin=margins.Margin(m.scale, m.m1, m.m2, m.m3),
                embedding_size=self.config.model.embedding_size)

  @property
  def joint(self) -> bool:
    """Whether the space searches skip connections too (ENAS macro, NAS-Arch)."""
    return isinstance(self.space, JointSpace)

  @property
  def retrain_space(self) -> SearchSpace | JointSpace:
    """The space of the retrained fixed networks: the search space, or for the joint
    space its ``model.retrain_channels`` / ``model.retrain_widen`` version."""
    if not self.joint:
      return self.space
    m = self.config.model
    return dataclasses.replace(self.space, channels=m.retrain_channels or m.channels,
                               widen=m.retrain_widen)

  @property
  def node_names(self) -> list[str]:
    """One name per node (``layer{j}`` for the joint space)."""
    if self.joint:
      return [f'layer{j}' for j in range(self.space.num_layers)]
    return [n.name for n in self.space.nodes]

  def policy(self, search: str = 'joint') -> policy_lib.Policy:
    """The controller policy of the space (``search`` applies to the joint space only:
    see :func:`nar_jax.policy.joint_policy`)."""
    c = self.config.search.controller
    if self.joint:
      return policy_lib.joint_policy(self.space, c.tanh_constant, c.hidden, c.init_range,
                                     c.skip_target, c.skip_weight, search,
                                     controller_kind=c.kind)
    prior = (controller_lib.original_prior(self.mask, self.space.baseline(), c.original_prob)
             if c.original_prob > 0 else None)
    return policy_lib.operator_policy(self.mask, c.tanh_constant, c.hidden, c.init_range, c.kind,
                                      prior)

  def count_arguments(self) -> tuple[tuple[int, int], int, int, int | None]:
    """``(image_hw, in_channels, num_classes, embedding_size)`` of :meth:`counts`: face
    networks without their classifier (the paper's and ArcFace's convention: the
    classifier is dropped after training)."""
    h, w, c = self.splits.image_shape
    num_classes = 0 if self.faces else self.splits.num_classes
    # IR spaces carry their embedding size; model.head='face' uses model.embedding_size.
    embedding_size = (self.config.model.embedding_size
                      if self.faces and not config_lib.is_face_model(self.config) else None)
    return (h, w), c, num_classes, embedding_size

  @functools.cached_property
  def cost(self) -> reinforce.CostReward | None:
    """The resource-aware reward of ``config.search.cost``, or ``None`` (accuracy alone)."""
    cfg = self.config.search.cost
    if cfg.target_macs == 0:
      return None
    target = cfg.target_macs
    if target <= 1:
      target *= self.counts(self.space.baseline()).macs
    return reinforce.CostReward(counting.macs_model(self.retrain_space, *self.count_arguments()),
                                float(target), cfg.weight, cfg.weight_below)

  def score(self, valid_acc: float, macs: int) -> float:
    """What derive ranks an architecture of ``macs`` MACs by: the controller's reward
    without its entropy bonus (accuracy, times the cost factor when ``config.search.cost``
    is set)."""
    if self.cost is None:
      return valid_acc
    c = self.cost
    return float(reinforce.cost_aware_reward(valid_acc, macs, c.target_macs, c.weight,
                                             c.weight_below))

  @property
  def used_mask(self) -> train.UsedMask:
    """Which supernet leaves an architecture uses (:func:`train.make_train_step`)."""
    if self.joint:
      return functools.partial(macro.branch_mask, space=self.space)
    return resnet.branch_mask

  def parse_arch(self, text: str) -> tuple[int, ...]:
    """``config.arch`` as a validated architecture: ``'baseline'``, the path of an
    ``arch.json`` (its ``arch``), a JSON list (op names, or for the joint space the
    readable layers or the flat vector), or comma-separated op names (joint: the flat
    vector's integers)."""
    text = text.strip()
    if text == 'baseline':
      return self.space.baseline()
    if text.endswith('.json'):
      text = config_lib.expand_path(text)
      if not os.path.exists(text):
        raise ValueError(f'config.arch names {text}, which does not exist')
      with open(text) as f:
        return self.space.validate(json.load(f)['arch'])
    if text.startswith('['):
      return self.space.validate(json.loads(text))
    entries = [e.strip() for e in text.split(',')]
    if self.joint:
      if not all(e.lstrip('-').isdigit() for e in entries):
        raise ValueError(f'config.arch for the joint space must be an arch.json path, JSON, or '
                         f'the flat vector as comma-separated integers; got {text!r}')
      entries = [int(e) for e in entries]
    return self.space.validate(entries)

  def model(self, arch: tuple[int, ...] | None = None,
            num_classes: int | None = None) -> ResNet | IResNet | MacroNet:
    """The supernet (``arch=None``) or the fixed network ``arch``, for ``num_classes``
    classes (default: the search data's)."""
    num_classes = num_classes or self.splits.num_classes
    if self.joint:
      return MacroNet(self.space if arch is None else self.retrain_space, num_classes, arch=arch,
                      dtype=self.dtype, bn_axis_name=train.DATA_AXIS, choice=self.choice,
                      **self.face_head_kwargs)
    if self.space.family == 'ir':
      return IResNet(self.space, num_classes, arch=arch,
                     margin=self.face_head_kwargs['margin'], dtype=self.dtype,
                     bn_axis_name=train.DATA_AXIS, choice=self.choice)
    return ResNet(self.space, num_classes, arch=arch, dtype=self.dtype,
                  bn_axis_name=train.DATA_AXIS, choice=self.choice, **self.face_head_kwargs)

  def counts(self, arch) -> ops.Counts:
    """Parameters and MACs of ``arch`` (:meth:`count_arguments`)."""
    if self.joint:
      return counting.count_joint_architecture(self.retrain_space, arch, *self.count_arguments())
    return counting.count_architecture(self.space, arch, *self.count_arguments())

  def result_path(self, phase: str) -> str:
    return os.path.join(self.workdir, 'results', f'{phase}.json')

  def load_result(self, phase: str) -> dict | None:
    path = self.result_path(phase)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def save_result(self, phase: str, result: dict) -> None:
    _write_json(self.result_path(phase), result)


def _write_json(path: str, obj: Any) -> None:
  """Writes atomically: a finished phase's record is either complete or absent."""
  _write_text(path, json.dumps(obj, indent=2))


def _write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def build_space(config: ml_collections.ConfigDict) -> SearchSpace | JointSpace:
  m = config.model
  allowed = config_lib.restricted_ops(config) or None
  if config_lib.is_joint_model(config):
    return joint_space(m.num_layers, m.channels, candidates=allowed)
  if config_lib.is_face_model(config):
    if not m.base[2:].isdigit():
      raise ValueError(f"config.model.base={m.base!r}: IR bases are 'ir18', 'ir34', 'ir50' "
                       "or 'ir100'")
    return ir_space(int(m.base[2:]), m.width, m.candidate_rule,
                    **({'allowed': allowed} if allowed else {}), embedding_size=m.embedding_size)
  return resnet_space(m.base, m.granularity, m.width, m.candidate_rule, allowed)


def face_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The insightface directory of a face run; synthetic faces are written on first use."""
  ds = config.dataset
  if ds.name == 'faces':
    return config_lib.expand_path(ds.data_dir)
  directory = config_lib.expand_path(ds.data_dir) or os.path.join(workdir, 'data')
  if not os.path.exists(os.path.join(directory, 'property')):
    s = ds.synthetic
    synthetic_faces.write_synthetic_faces(
        directory, num_identities=s.num_identities, images_per_identity=s.images_per_identity,
        image_size=s.image_size, num_pairs=s.num_pairs,
        verification_identities=s.verification_identities, seed=config.seed)
  return directory


def face_splits(config: ml_collections.ConfigDict, workdir: str, proxy: bool) -> data.Splits:
  """The proxy task (``proxy=True``, for the search) or every identity (retraining).

  The selection is stored as an index over ``train.rec`` in the workdir
  (``proxy_index.npz`` / ``full_index.npz``), so a resumed run uses the same images.
  """
  p = config.dataset.proxy
  name = 'proxy_index.npz' if proxy else 'full_index.npz'
  return faces.load_face_splits(
      face_directory(config, workdir), proxy=proxy, num_identities=p.num_identities,
      images_per_identity=p.images_per_identity, valid_per_identity=p.valid_per_identity,
      seed=config.seed, index_path=os.path.join(workdir, name))


def face_classification_splits(splits: data.Splits, valid_per_identity: int) -> data.Splits:
  """A face proxy task as plain classification of its identities (softmax networks).

  ``test`` is the proxy task's validation split; ``valid`` the last
  ``valid_per_identity`` training images of each identity; ``train`` the rest. No
  image is in two splits; every identity is in all three.
  """
  labels = splits.train.labels
  rank_from_end = np.zeros(len(labels), np.int64)
  for label in np.unique(labels):
    where = np.flatnonzero(labels == label)
    rank_from_end[where] = np.arange(len(where))[::-1]
  is_valid = rank_from_end < valid_per_identity
  if not np.any(~is_valid):
    raise ValueError(f'config.dataset.proxy leaves no training image per identity after '
                     f'{valid_per_identity} validation images')
  images = splits.train.images
  subset = lambda index: images.take(index) if isinstance(images, faces.LazyImages) else images[index]
  take = lambda keep: data.Split(subset(np.flatnonzero(keep)), labels[keep])
  return dataclasses.replace(splits, train=take(~is_valid), valid=take(is_valid),
                             test=splits.valid)


def load_data(config: ml_collections.ConfigDict, workdir: str) -> data.Splits:
  """The search data: the dataset's train/valid/test, or a face proxy task (for a
  softmax head: :func:`face_classification_splits`)."""
  ds = config.dataset
  if ds.name in config_lib.FACE_DATASETS:
    proxy = face_splits(config, workdir, proxy=True)
    if config_lib.is_face_network(config):
      return proxy
    return face_classification_splits(proxy, ds.proxy.valid_per_identity)
  return data.load_splits(ds.name, data_dir=ds.data_dir or None,
                          valid_size=None if ds.valid_size < 0 else ds.valid_size,
                          seed=config.seed)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """Validates the config, writes it to ``<workdir>/config.json`` (:data:`CONFIG_FILE`)
  and builds the data, space, mesh and log."""
  config_lib.validate(config)
  mesh = train.make_mesh(config.num_devices)
  for name in ('child.batch_size', 'retrain.batch_size', 'search.controller.valid_batch_size',
               'eval_batch_size'):
    train.check_batch_size(config_lib.field(config, name), mesh, f'config.{name}')
  os.makedirs(workdir, exist_ok=True)
  write_config(config, workdir)
  log = Log(workdir)
  ds = config.dataset
  splits = load_data(config, workdir)
  searched = () if config.arch else (
      ('child.batch_size', splits.train, config.child.batch_size),
      ('search.controller.valid_batch_size', splits.valid,
       config.search.controller.valid_batch_size))
  for name, split, batch in searched:  # only a search uses them
    if batch > len(split):
      raise ValueError(f'config.{name}={batch} exceeds the {len(split)} examples of its split')
  space = build_space(config)
  log.info(f'{ds.name}: train {len(splits.train)}, valid {len(splits.valid)}, '
           f'test {len(splits.test)}, image {splits.image_shape}, {splits.num_classes} classes')
  log.info(f'search space {space.name} (width {config.model.width}): {space.num_nodes} nodes; '
           f'devices: {mesh.devices.size} x {mesh.devices.flat[0].platform}')
  return Experiment(config, workdir, splits, space, mesh, log, jax.random.PRNGKey(config.seed))


# ---------------------------------------------------------------------------------------
# Training loops.
# ---------------------------------------------------------------------------------------


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
  fetched = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in fetched])) for k in ('loss', 'accuracy')}


def train_epoch(exp: Experiment, step_fn: Callable, state: train.TrainState, split: data.Split,
                batch_size: int, epoch: int, key: jax.Array, sampler_params: Any,
                progress: Progress) -> tuple[train.TrainState, dict[str, float]]:
  """One epoch of ``step_fn`` over ``split``; returns the state and epoch statistics.

  The returned ``step_s`` is the median wall time per step over the logging
  intervals (the first step, which includes compilation, is timed separately as
  ``first_step_s``). With ``config.scan_epoch`` the epoch runs as one ``lax.scan``
  (:func:`_scan_epoch`).
  """
  if exp.config.get('scan_epoch', False):
    return _scan_epoch(exp, step_fn, state, split, batch_size, epoch, key, sampler_params,
                       progress)
  every = exp.config.log_every_steps
  total = data.num_batches(split, batch_size)
  pending, epoch_metrics, interval_times = [], [], []
  first_step_s = None
  tick = time.time()
  # The next batch is read (and, for faces, JPEG-decoded) while the device trains.
  batches = data.prefetch(data.batches(split, batch_size, seed=exp.config.seed, epoch=epoch))
  for i, (images, labels) in enumerate(batches):
    state, metrics = step_fn(state, train.shard(exp.mesh, images), train.shard(exp.mesh, labels),
                             key, sampler_params)
    pending.append(metrics)
    if i == 0:
      jax.block_until_ready(state)
      first_step_s = time.time() - tick
      epoch_metrics.append(_mean_metrics(pending))
      pending, tick = [], time.time()
      progress.update(1, f'epoch {epoch + 1} step 1/{total} (first step {first_step_s:.2f} s)')
    elif (i + 1) % every == 0 or i + 1 == total:
      means = _mean_metrics(pending)  # Fetching the metrics waits for the steps.
      interval_times.append((time.time() - tick) / len(pending))
      epoch_metrics.append(means)
      progress.update(len(pending), f'epoch {epoch + 1} step {i + 1}/{total} | loss {means["loss"]:.4f} '
                      f'acc {means["accuracy"]:.4f} | {interval_times[-1]:.3f} s/step')
      pending, tick = [], time.time()
  stats = {k: float(np.mean([m[k] for m in epoch_metrics])) for k in ('loss', 'accuracy')}
  stats['step_s'] = statistics.median(interval_times) if interval_times else first_step_s
  stats['first_step_s'] = first_step_s
  return state, stats


def _scan_epoch(exp: Experiment, step_fn: Callable, state: train.TrainState, split: data.Split,
                batch_size: int, epoch: int, key: jax.Array, sampler_params: Any,
                progress: Progress) -> tuple[train.TrainState, dict[str, float]]:
  """:func:`train_epoch` as one :func:`train.scan_epoch` call: the same batches in the
  same order, put on the devices at once. ``step_s`` is the epoch's wall time per
  step; when the call compiled the scan, ``first_step_s`` is that whole call."""
  images, labels = zip(*data.batches(split, batch_size, seed=exp.config.seed, epoch=epoch))
  epoch_fn = train.scan_epoch(step_fn)
  compiled_before = epoch_fn._cache_size()
  tick = time.time()
  state, metrics = epoch_fn(state, train.shard(exp.mesh, np.stack(images), 1),
                            train.shard(exp.mesh, np.stack(labels), 1), key, sampler_params)
  metrics = jax.device_get(metrics)
  elapsed = time.time() - tick
  stats = {k: float(np.mean(metrics[k])) for k in ('loss', 'accuracy')}
  stats['step_s'] = elapsed / len(images)
  stats['first_step_s'] = elapsed if epoch_fn._cache_size() > compiled_before else None
  progress.update(len(images), f'epoch {epoch + 1}: {len(images)} steps in one scan | loss '
                  f'{stats["loss"]:.4f} acc {stats["accuracy"]:.4f} | {stats["step_s"]:.3f} s/step')
  return state, stats


def evaluate(exp: Experiment, eval_fn: Callable, variables: Any, split: data.Split,
             op_indices: Any = None) -> dict[str, float]:
  """Accuracy and mean loss over a whole split (last batch padded, padding weighted 0)."""
  batch = exp.config.eval_batch_size
  sums = {'correct': 0.0, 'loss': 0.0, 'count': 0.0}
  for start in range(0, len(split), batch):
    images = split.images[start:start + batch]
    labels = split.labels[start:start + batch]
    weights = np.ones(len(labels), np.float32)
    pad = batch - len(labels)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    out = eval_fn(variables, train.shard(exp.mesh, images), train.shard(exp.mesh, labels),
                  train.shard(exp.mesh, weights), op_indices)
    sums = jax.tree.map(lambda a, b: a + float(b), sums, jax.device_get(out))
  return {'accuracy': sums['correct'] / sums['count'], 'loss': sums['loss'] / sums['count']}


def _resume(ckpt: PhaseCheckpoints, state: Any, exp: Experiment,
            phase: str) -> tuple[Any, dict[str, Any]]:
  """Restores the latest checkpoint of a phase, if any; returns (state, meta).

  ``meta`` holds ``epoch`` (epochs done) and ``step_times`` (median s/step of each).
  """
  latest = ckpt.latest_step()
  if latest is None:
    return state, {'epoch': 0, 'step_times': []}
  state, meta = ckpt.restore(latest, state)
  exp.log.info(f'[{phase}] resumed from {ckpt.directory} after epoch {meta["epoch"]}')
  return state, meta


# ---------------------------------------------------------------------------------------
# Phases.
# ---------------------------------------------------------------------------------------


def _child_optimizer(exp: Experiment):
  """The shared-weight optimizer (pretraining and search continue one schedule)."""
  steps_per_epoch = data.num_batches(exp.splits.train, exp.config.child.batch_size)
  return train.child_optimizer(exp.config.child.optimizer, steps_per_epoch)


def _child_step(exp: Experiment, tx, sample_arch):
  return train.make_train_step(
      exp.model(), tx, exp.mesh, mean=exp.splits.mean, std=exp.splits.std,
      crop_padding=exp.config.dataset.crop_padding, flip=exp.config.dataset.flip,
      sample_arch=sample_arch, used_mask=exp.used_mask)


def run_pretrain(exp: Experiment) -> train.TrainState:
  """Trains the shared weights with uniformly random architectures (the paper's PreTrain)."""
  tx = _child_optimizer(exp)
  state = train.replicate(exp.mesh, train.create_train_state(
      exp.key('init'), exp.model(), exp.splits.image_shape, tx, jnp.asarray(exp.space.baseline())))
  epochs = exp.config.pretrain.epochs
  if epochs == 0:
    return state
  ckpt = PhaseCheckpoints(exp.workdir, 'pretrain')
  state, meta = _resume(ckpt, state, exp, 'pretrain')
  done = meta['epoch']
  if done < epochs:
    uniform = exp.policy().uniform
    step_fn = _child_step(exp, tx, lambda key, _: uniform(key))
    batch = exp.config.child.batch_size
    per_epoch = data.num_batches(exp.splits.train, batch)
    progress = Progress(exp.log, 'pretrain', epochs * per_epoch, done * per_epoch)
    for epoch in range(done, epochs):
      state, stats = train_epoch(exp, step_fn, state, exp.splits.train, batch, epoch,
                                 exp.key('pretrain'), None, progress)
      exp.log.record(phase='pretrain', epoch=epoch + 1, train_loss=stats['loss'],
                     train_acc=stats['accuracy'], step_s=stats['step_s'])
      meta = {'epoch': epoch + 1, 'step_times': meta['step_times'] + [stats['step_s']]}
      ckpt.save(epoch + 1, state, meta)
  ckpt.close()
  return state


def _reward_data(exp: Experiment) -> tuple[Any, np.ndarray]:
  """What controller rewards are measured on: ``(images, targets)`` with one target
  per image (the validation split), or per pair (a face pair set, images ``2i, 2i+1``)."""
  if exp.config.search.reward == 'accuracy':
    return exp.splits.valid.images, exp.splits.valid.labels
  name = exp.config.search.reward_pairs
  pairs = faces.load_verification_set(
      os.path.join(face_directory(exp.config, exp.workdir), f'{name}.bin'),
      exp.splits.image_shape)
  return pairs.images, pairs.issame


def _controller_batches(exp: Experiment, reward_data: tuple[Any, np.ndarray], epoch: int,
                        update: int) -> tuple[np.ndarray, np.ndarray]:
  """One minibatch per architecture: ``(M, B, H, W, C)`` images and ``(M, B)`` labels, or
  for verification rewards ``B / 2`` pairs per architecture and ``(M, B / 2)`` issame."""
  c = exp.config.search.controller
  rng = np.random.default_rng([exp.config.seed, epoch, update])
  images, targets = reward_data
  per_target = 1 if exp.config.search.reward == 'accuracy' else 2
  index = np.stack([rng.choice(len(targets), c.valid_batch_size // per_target, replace=False)
                    for _ in range(c.num_aggregate)])
  image_index = index if per_target == 1 else np.stack([2 * index, 2 * index + 1], -1).reshape(
      len(index), -1)
  return images[image_index], targets[index]


def run_search(exp: Experiment, child: train.TrainState) -> dict[str, Any]:
  """ENAS alternation: a child epoch (controller-sampled architectures), then controller updates.

  Returns ``({'child': TrainState, 'controller': ControllerState}, meta)``: ``meta``
  holds ``step_times`` (the median supernet s/step of each search epoch) and ``curve``
  (:func:`_epoch_summary` of each epoch).
  """
  c = exp.config.search.controller
  ctrl_tx = train.controller_optimizer(c)
  policy = exp.policy()
  ctrl = train.controller_state(policy.init(exp.key('controller')), ctrl_tx)
  state = {'child': child, 'controller': train.replicate(exp.mesh, ctrl)}
  ckpt = PhaseCheckpoints(exp.workdir, 'search')
  state, meta = _resume(ckpt, state, exp, 'search')
  done, epochs = meta['epoch'], exp.config.search.epochs
  random_search = exp.config.search.method == 'random'
  if done < epochs:
    tx = _child_optimizer(exp)
    if random_search:  # the untrained policy's architectures, no controller updates
      step_fn = _child_step(exp, tx, lambda key, _: policy.uniform(key))
    else:
      step_fn = _child_step(exp, tx, lambda key, params: policy.sample(params, key).arch)
    update_fn = controller_update(exp, policy, ctrl_tx)
    reward_data = _reward_data(exp)
    batch = exp.config.child.batch_size
    per_epoch = data.num_batches(exp.splits.train, batch)
    progress = Progress(exp.log, 'search', epochs * per_epoch, done * per_epoch)
    for epoch in range(done, epochs):
      child, stats = train_epoch(exp, step_fn, state['child'], exp.splits.train, batch, epoch,
                                 exp.key('search'), state['controller'].params, progress)
      exp.log.record(phase='search', epoch=epoch + 1, train_loss=stats['loss'],
                     train_acc=stats['accuracy'], step_s=stats['step_s'])
      ctrl = state['controller']
      tick = time.time()
      epoch_key = jax.random.fold_in(exp.key('controller'), epoch)
      ctrl, update_metrics = ((ctrl, []) if random_search else controller_updates(
          exp, update_fn, ctrl, child.variables, reward_data, epoch, epoch_key))
      for u, m in enumerate(update_metrics):
        exp.log.record(phase='controller', epoch=epoch + 1, update=u + 1, **m)
      if update_metrics:
        _log_updates(exp, 'search', epoch, update_metrics, time.time() - tick)
      state = {'child': child, 'controller': ctrl}
      meta = {'epoch': epoch + 1, 'step_times': meta['step_times'] + [stats['step_s']],
              'curve': meta.get('curve', []) + [_epoch_summary(epoch, stats, update_metrics)]}
      ckpt.save(epoch + 1, state, meta)
  ckpt.close()
  return state, meta


def _epoch_summary(epoch: int, stats: dict[str, float], updates: list[dict]) -> dict[str, Any]:
  """One row of the search's learning curve: the epoch's shared-weight training loss
  and accuracy and, when the controller learned, the mean validation accuracy of its
  sampled architectures, and the entropy and mean MACs of its last update."""
  row = {'epoch': epoch + 1, 'train_loss': stats['loss'], 'train_acc': stats['accuracy'],
         'valid_acc': None, 'entropy': None, 'macs': None}
  if updates:
    row.update(valid_acc=float(np.mean([m['valid_acc'] for m in updates])),
               entropy=float(updates[-1]['entropy']),
               macs=float(updates[-1]['macs']) if 'macs' in updates[-1] else None)
  return row


def controller_update(exp: Experiment, policy: policy_lib.Policy, ctrl_tx) -> Callable:
  """The jitted controller update of ``policy`` with the config's reward and recipe."""
  c = exp.config.search.controller
  return train.make_controller_update(
      exp.model(), ctrl_tx, exp.mesh, policy=policy, mean=exp.splits.mean, std=exp.splits.std,
      entropy_weight=c.entropy_weight, baseline_decay=c.baseline_decay,
      batch_statistics=exp.config.search.batch_statistics, reward=exp.config.search.reward,
      cost=exp.cost)


def controller_updates(exp: Experiment, update_fn: Callable, ctrl: train.ControllerState,
                       variables: Any, reward_data: tuple[Any, np.ndarray], epoch: int,
                       epoch_key: jax.Array, *args) -> tuple[train.ControllerState, list[dict]]:
  """One epoch's ``updates_per_epoch`` controller updates; returns the state and the
  fetched metrics of each update (``args``: the policy's extra arguments)."""
  pending = []
  for u in range(exp.config.search.controller.updates_per_epoch):
    images, targets = _controller_batches(exp, reward_data, epoch, u)
    targets = (train.shard(exp.mesh, targets, 1) if exp.config.search.reward == 'accuracy'
               else train.replicate(exp.mesh, targets))
    ctrl, m = update_fn(ctrl, variables, train.shard(exp.mesh, images, 1), targets,
                        jax.random.fold_in(epoch_key, u), *args)
    pending.append(m)
  return ctrl, jax.device_get(pending)


def _log_updates(exp: Experiment, phase: str, epoch: int, metrics: list[dict],
                 seconds: float) -> None:
  last = metrics[-1]
  exp.log.info(f'[{phase}] epoch {epoch + 1}: {len(metrics)} controller updates in '
               f'{seconds:.1f} s | reward {last["reward"]:.4f} baseline '
               f'{last["baseline"]:.4f} entropy {last["entropy"]:.3f}')


def supernet_eval_step(exp: Experiment) -> Callable:
  """The eval step that scores architectures with the shared weights (derive)."""
  return train.make_eval_step(exp.model(), exp.mesh, mean=exp.splits.mean, std=exp.splits.std,
                              batch_statistics=exp.config.search.batch_statistics)


def score_proposals(exp: Experiment, eval_fn: Callable, variables: Any,
                    proposals: list[tuple[str, Any]], phase: str) -> list[dict[str, Any]]:
  """Scores ``(source, sample)`` proposals (``sample.arch``, ``sample.log_prob``) on the
  whole validation split with the shared weights (``eval_fn``:
  :func:`supernet_eval_step`), dropping repeated architectures.

  Returns one dict per distinct architecture: ``source``, ``arch`` (readable),
  ``op_indices`` (the vector), ``log_prob``, ``valid_acc``, ``macs`` and ``score``
  (:meth:`Experiment.score`, what derive ranks by).
  """
  seen, candidates = set(), []
  for source, s in proposals:
    arch = tuple(int(a) for a in jax.device_get(s.arch))
    if arch in seen:
      continue
    seen.add(arch)
    scores = evaluate(exp, eval_fn, variables, exp.splits.valid, jnp.asarray(arch))
    macs = exp.counts(arch).macs
    candidates.append({'source': source, 'arch': exp.space.names(arch), 'op_indices': list(arch),
                       'log_prob': float(s.log_prob), 'valid_acc': scores['accuracy'],
                       'macs': macs, 'score': exp.score(scores['accuracy'], macs)})
    exp.log.info(f'[{phase}] {source}: valid acc {scores["accuracy"]:.4f} score '
                 f'{candidates[-1]["score"]:.4f} MACs {macs:,} '
                 f'{report.arch_text(candidates[-1]["arch"])}')
  return candidates


def run_derive(exp: Experiment, search: dict[str, Any]) -> dict[str, Any]:
  """Scores the controller's most likely and ``num_samples`` sampled architectures on the
  whole validation split with the shared weights; keeps the best score (first on ties).

  Random search (``search.method='random'``) scores ``num_samples`` architectures of the
  untrained policy (``policy.uniform``) instead: the best of N random architectures.
  """
  policy = exp.policy()
  params = search['controller'].params
  keys = jax.random.split(exp.key('derive'), exp.config.derive.num_samples)
  if exp.config.search.method == 'random':
    proposals = [(f'random_{i}', _Proposal(policy.uniform(k), 0.0)) for i, k in enumerate(keys)]
  else:
    proposals = [('most_likely', policy.most_likely(params))]
    proposals += [(f'sample_{i}', policy.sample(params, k)) for i, k in enumerate(keys)]
  variables = search['child'].variables
  eval_fn = supernet_eval_step(exp)
  candidates = score_proposals(exp, eval_fn, variables, proposals, 'derive')
  best = max(candidates, key=lambda cand: cand['score'])
  baseline = exp.space.baseline()
  baseline_scores = evaluate(exp, eval_fn, variables, exp.splits.valid, jnp.asarray(baseline))
  return {'best': best, 'candidates': candidates,
          'baseline': {'arch': exp.space.names(baseline), 'valid_acc': baseline_scores['accuracy']}}


class _Proposal(NamedTuple):
  """A proposal that is not a controller sample (random search): ``log_prob`` 0."""

  arch: jax.Array
  log_prob: float


def run_alternating(exp: Experiment, child: train.TrainState) -> tuple[dict[str, Any], list]:
  """The alternating search (:mod:`nar_jax.alternating`) on the supernet, from the
  joint space's baseline architecture.

  Each phase runs ``alternating.epochs_per_phase`` search epochs (a child epoch with
  architectures from the forced controller, then its updates; one joint controller
  and one set of shared weights throughout), then scores the phase's proposals on
  the validation split. Checkpointed after every phase (``checkpoints/alternating``);
  logs ``phase='alternating'`` records (the ER sequence) and controller records with
  ``search`` and ``round``. Returns a derive-like result (``best``, ``candidates`` of
  the last phase, ``baseline``, ``alternating``: history and stop reason) and the
  supernet s/step of each epoch.
  """
  cfg, c = exp.config.alternating, exp.config.search.controller
  ctrl_tx = train.controller_optimizer(c)
  policies = {search: exp.policy(search) for search in alternating.PHASES}
  ctrl = train.controller_state(policies['operators'].init(exp.key('controller')), ctrl_tx)
  state = {'child': child, 'controller': train.replicate(exp.mesh, ctrl)}
  ckpt = PhaseCheckpoints(exp.workdir, 'alternating')
  state, meta = _resume(ckpt, state, exp, 'alternating')
  meta.setdefault('history', [])
  tx = _child_optimizer(exp)
  steps = {s: _child_step(exp, tx, lambda key, p, s=s: policies[s].sample(p[0], key, p[1]).arch)
           for s in alternating.PHASES}
  updates = {s: controller_update(exp, policies[s], ctrl_tx) for s in alternating.PHASES}
  reward_data = _reward_data(exp)
  eval_fn = supernet_eval_step(exp)
  batch = exp.config.child.batch_size
  per_epoch = data.num_batches(exp.splits.train, batch)
  progress = Progress(exp.log, 'alternating', 2 * cfg.max_rounds * cfg.epochs_per_phase * per_epoch,
                      meta['epoch'] * per_epoch)

  def run_phase(search, incumbent, round_, index):
    nonlocal state
    fixed = jnp.asarray(incumbent, jnp.int32)
    child, ctrl = state['child'], state['controller']
    for i in range(cfg.epochs_per_phase):
      epoch = index * cfg.epochs_per_phase + i
      child, stats = train_epoch(exp, steps[search], child, exp.splits.train, batch, epoch,
                                 exp.key('search'), (ctrl.params, fixed), progress)
      exp.log.record(phase='search', epoch=epoch + 1, search=search, round=round_,
                     train_loss=stats['loss'], train_acc=stats['accuracy'],
                     step_s=stats['step_s'])
      meta['step_times'].append(stats['step_s'])
      tick = time.time()
      ctrl, metrics = controller_updates(exp, updates[search], ctrl, child.variables, reward_data,
                                         epoch, jax.random.fold_in(exp.key('controller'), epoch),
                                         fixed)
      for u, m in enumerate(metrics):
        exp.log.record(phase='controller', epoch=epoch + 1, update=u + 1, search=search,
                       round=round_, **m)
      if metrics:
        _log_updates(exp, f'alternating {search} {round_}', epoch, metrics, time.time() - tick)
    state = {'child': child, 'controller': ctrl}
    proposals = alternating.propose(policies[search], ctrl.params, incumbent,
                                    jax.random.fold_in(exp.key('derive'), index), cfg.num_samples)
    return score_proposals(exp, eval_fn, child.variables, proposals,
                           f'alternating {search} {round_}')

  def on_phase(entry, history):
    exp.log.info(f'[alternating] {entry["phase"]} phase of round {entry["round"]}: ER '
                 f'{entry["er"]:.4f} (incumbent {entry["incumbent_reward"]:.4f}, '
                 f'{"improved" if entry["improved"] else "kept the incumbent"})')
    exp.log.record(phase='alternating', step=len(history), search=entry['phase'],
                   round=entry['round'], er=entry['er'],
                   incumbent_reward=entry['incumbent_reward'], improved=entry['improved'],
                   arch=entry['op_indices'])
    meta['history'] = history
    meta['epoch'] = len(history) * cfg.epochs_per_phase
    ckpt.save(len(history), state, meta)

  outcome = alternating.alternate(exp.space.baseline(), run_phase, tolerance=cfg.tolerance,
                                  max_rounds=cfg.max_rounds, history=meta['history'],
                                  on_phase=on_phase)
  ckpt.close()
  exp.log.info(f'[alternating] stopped ({outcome["stopped"]}) after {len(outcome["history"])} '
               f'phases; ER sequence {[round(h["er"], 4) for h in outcome["history"]]}')
  last = outcome['history'][-1]
  best = next(cand for cand in last['candidates'] if cand['op_indices'] == last['op_indices'])
  baseline = exp.space.baseline()
  baseline_scores = evaluate(exp, eval_fn, state['child'].variables, exp.splits.valid,
                             jnp.asarray(baseline))
  history = [{k: v for k, v in h.items() if k != 'candidates'} for h in outcome['history']]
  return {'best': best, 'candidates': last['candidates'],
          'baseline': {'arch': exp.space.names(baseline), 'valid_acc': baseline_scores['accuracy']},
          'alternating': {'history': history, 'stopped': outcome['stopped']}}, meta['step_times']


def retrain_splits(exp: Experiment) -> data.Splits:
  """What retraining learns from: the search data, or for faces with
  ``retrain.data='full'`` every identity of ``train.rec`` (the paper)."""
  if exp.faces and exp.config.retrain.data == 'full':
    return face_splits(exp.config, exp.workdir, proxy=False)
  return exp.splits


def verify(exp: Experiment, model: IResNet | ResNet | MacroNet,
           variables: Any) -> dict[str, dict[str, float]]:
  """insightface's verification of a face network on every ``.bin`` of the config.

  Returns ``{name: {'accuracy', 'accuracy_std', 'tar', 'tar_std', 'far'}}``.
  """
  names = config_lib.verification_names(exp.config)
  if not names:
    return {}
  embed = train.make_embed_step(model, exp.mesh, mean=exp.splits.mean, std=exp.splits.std)
  batch = exp.config.eval_batch_size
  directory = face_directory(exp.config, exp.workdir)
  results = {}
  for name in names:
    pairs = faces.load_verification_set(os.path.join(directory, f'{name}.bin'),
                                        exp.splits.image_shape)
    r = verification.verify(lambda x: embed(variables, train.shard(exp.mesh, x)), pairs.images,
                            pairs.issame, batch_size=batch)
    results[name] = {'accuracy': r.accuracy_mean, 'accuracy_std': r.accuracy_std,
                     'tar': r.tar, 'tar_std': r.tar_std, 'far': r.far}
  return results


def run_retrain(exp: Experiment, name: str, arch: tuple[int, ...]) -> dict[str, Any]:
  """Trains the fixed network ``arch`` from scratch on train+valid; tests it on test
  (and, for faces, verifies it on the config's ``.bin`` pair sets)."""
  phase = f'retrain_{name}'
  cfg = exp.config.retrain
  splits = retrain_splits(exp)
  split = data.merge(splits.train, splits.valid)
  per_epoch = data.num_batches(split, cfg.batch_size)
  tx = train.child_optimizer(cfg.optimizer, per_epoch)
  model = exp.model(arch, splits.num_classes)
  state = train.replicate(exp.mesh, train.create_train_state(
      exp.key(phase), model, exp.splits.image_shape, tx, None))
  ckpt = PhaseCheckpoints(exp.workdir, phase)
  state, meta = _resume(ckpt, state, exp, phase)
  done = meta['epoch']
  step_fn = train.make_train_step(model, tx, exp.mesh, mean=exp.splits.mean, std=exp.splits.std,
                                  crop_padding=exp.config.dataset.crop_padding,
                                  flip=exp.config.dataset.flip, sample_arch=None)
  progress = Progress(exp.log, phase, cfg.epochs * per_epoch, done * per_epoch)
  stats = {}
  for epoch in range(done, cfg.epochs):
    state, stats = train_epoch(exp, step_fn, state, split, cfg.batch_size, epoch, exp.key(phase),
                               None, progress)
    exp.log.record(phase=phase, epoch=epoch + 1, train_loss=stats['loss'],
                   train_acc=stats['accuracy'], step_s=stats['step_s'])
    every = cfg.verify_every_epochs
    if every and (epoch + 1) % every == 0 and epoch + 1 < cfg.epochs:
      _log_verification(exp, phase, verify(exp, model, state.variables), epoch + 1)
    meta = {'epoch': epoch + 1, 'step_times': meta['step_times'] + [stats['step_s']]}
    ckpt.save(epoch + 1, state, meta)
  ckpt.close()
  result = {'arch': exp.space.names(arch), 'test_acc': None, 'test_loss': None,
            'final_train_acc': stats.get('accuracy'), 'step_s': _median(meta['step_times'])}
  if len(splits.test):
    eval_fn = train.make_eval_step(model, exp.mesh, mean=splits.mean, std=splits.std)
    test = evaluate(exp, eval_fn, state.variables, splits.test)
    exp.log.info(f'[{phase}] test acc {test["accuracy"]:.4f} loss {test["loss"]:.4f}')
    exp.log.record(phase=phase, test_acc=test['accuracy'], test_loss=test['loss'])
    result.update(test_acc=test['accuracy'], test_loss=test['loss'])
  if exp.faces:
    result['verification'] = verify(exp, model, state.variables)
    _log_verification(exp, phase, result['verification'], cfg.epochs)
  return result


def _log_verification(exp: Experiment, phase: str, results: dict, epoch: int) -> None:
  for name, r in results.items():
    exp.log.info(f'[{phase}] epoch {epoch} {name}: accuracy {r["accuracy"]:.4f} '
                 f'+- {r["accuracy_std"]:.4f}, TAR {r["tar"]:.4f} @ FAR {r["far"]:.2e}')
    exp.log.record(phase=phase, epoch=epoch, verification=name, **r)


# ---------------------------------------------------------------------------------------
# The whole run.
# ---------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
  return statistics.median(values) if values else None


def _cached(exp: Experiment, phase: str, fn: Callable[[], dict]) -> dict:
  """Runs a phase unless its result is already recorded."""
  result = exp.load_result(phase)
  if result is not None:
    exp.log.info(f'[{phase}] already done ({exp.result_path(phase)})')
    return result
  result = fn()
  exp.save_result(phase, result)
  return result


def _searched(exp: Experiment) -> dict:
  """Pretrain, search and derive; returns the derive result."""

  def search_and_derive():
    tick = time.time()
    shared = run_pretrain(exp)
    if exp.config.search.method == 'alternating':
      result, step_times = run_alternating(exp, shared)
    else:
      search, meta = run_search(exp, shared)
      step_times = meta['step_times']
      result = run_derive(exp, search)
      result['search_curve'] = meta.get('curve', [])
      result['uniform_entropy'] = float(np.sum(np.log(exp.mask.sum(axis=1))))
    result['search_seconds'] = time.time() - tick
    result['supernet_step_s'] = _median(step_times)
    return result

  return _cached(exp, 'derive', search_and_derive)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole pipeline; returns the report dict. The run holds the
  workdir (:func:`nar_jax.workdir.claim`: writable, locked, its config.json's config)."""
  workdir = config_lib.expand_path(workdir)
  with workdir_lib.claim(config, workdir):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  exp = setup(config, workdir)
  exp.log.text('config', f'```\n{config}\n```')
  baseline = exp.space.baseline()
  if config.arch:
    arch = exp.parse_arch(config.arch)
    derived = None
  else:
    derived = _searched(exp)
    arch = exp.space.validate(derived['best']['arch'])
  _write_json(os.path.join(workdir, 'arch.json'), {
      'space': exp.space.name, 'nodes': exp.node_names,
      'arch': exp.space.names(arch), 'op_indices': list(arch),
      'valid_acc': derived['best']['valid_acc'] if derived else None,
      'source': derived['best']['source'] if derived else 'config.arch',
  })
  refined = _cached(exp, 'retrain_refined', lambda: run_retrain(exp, 'refined', arch))
  if arch == baseline:
    base = refined
  elif config.retrain.baseline:
    base = _cached(exp, 'retrain_baseline', lambda: run_retrain(exp, 'baseline', baseline))
  else:
    base = None  # Not retrained: the report shows no baseline test accuracy.
  result = report.build(exp, arch, derived, refined, base)
  report.write(workdir, result)
  with open(os.path.join(workdir, 'report.md')) as f:
    exp.log.text('report', f.read())
  exp.log.close()
  exp.log.info(f'report: {os.path.join(workdir, "report.md")}')
  return result
