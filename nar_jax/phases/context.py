"""What the phases share: the run (:class:`Context`) and the networks it refines (:class:`Networks`).

:class:`Context` is the run: config, workdir, device mesh, log, RNG keys and the store of
finished phases' results. :class:`Networks` is what is refined: the family and task of the
config (:func:`nar_jax.families.family_for`, :func:`nar_jax.tasks.task_for`), the search
space and the data; it builds the supernet, fixed networks, counts and controller policy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nar_jax import config as config_lib
from nar_jax import data, distributed, families, files, ops, reinforce, tasks
from nar_jax import policy as policy_lib
from nar_jax.progress import Log

DATA_AXIS = 'data'
"""The mesh axis the batch is split over (:data:`nar_jax.train.DATA_AXIS`)."""

PHASE_KEYS = {'init': 0, 'pretrain': 1, 'search': 2, 'derive': 3, 'retrain_baseline': 4,
              'retrain_refined': 5, 'controller': 6, 'evaluate_random': 7, 'retrain_random': 8}
INDEXED_PHASES = ('retrain_random',)
"""Phase families ``<family>_<i>`` (e.g. ``retrain_random_03``, the search evaluation's
i-th random architecture): each member's key is the family's key folded with ``i``."""


class Results:
  """Finished phases' results: ``<workdir>/results/<phase>.json``, written atomically
  by process 0."""

  def __init__(self, workdir: str):
    self.workdir = workdir

  def path(self, phase: str) -> str:
    return os.path.join(self.workdir, 'results', f'{phase}.json')

  def load(self, phase: str) -> dict | None:
    path = self.path(phase)
    return files.read_json(path) if os.path.exists(path) else None

  def save(self, phase: str, result: dict) -> None:
    """Records ``result`` (process 0 writes it; every process computed it)."""
    if distributed.is_main_process():
      files.write_json(self.path(phase), result)


@dataclasses.dataclass(frozen=True)
class Context:
  """A run: its config, workdir, device mesh, log and root RNG key."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  log: Log
  root_key: jax.Array

  @functools.cached_property
  def results(self) -> Results:
    return Results(self.workdir)

  def key(self, phase: str) -> jax.Array:
    """The RNG key of ``phase``: a name of :data:`PHASE_KEYS`, or ``<family>_<i>`` of an
    indexed family (:data:`INDEXED_PHASES`)."""
    family, _, index = phase.rpartition('_')
    if family in INDEXED_PHASES and index.isdigit():
      return jax.random.fold_in(jax.random.fold_in(self.root_key, PHASE_KEYS[family]),
                                int(index))
    return jax.random.fold_in(self.root_key, PHASE_KEYS[phase])


@dataclasses.dataclass(frozen=True)
class Networks:
  """The networks a run refines.

  Attributes:
    config: the run's config.
    family: its search-space family; ``task``: its task.
    space: the search space; ``splits``: the search data (image shape, classes,
      normalisation statistics).
  """

  config: ml_collections.ConfigDict
  family: families.Family
  task: tasks.Task
  space: Any
  splits: data.Splits

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, workdir: str) -> 'Networks':
    """The networks of ``config``: its family and task, their space and the task's
    search data (face data under ``workdir`` when synthetic)."""
    family = families.family_for(config)
    task = tasks.task_for(config, family)
    return cls(config, family, task, family.space(config), task.search_splits(config, workdir))

  @functools.cached_property
  def retrain_space(self) -> Any:
    """The space of the retrained fixed networks (:attr:`Family.retrain_space`)."""
    return self.family.retrain_space(self.config, self.space)

  @functools.cached_property
  def head(self):
    return self.task.head(self.config)

  @property
  def mask(self) -> np.ndarray:
    return self.space.candidate_mask()

  @property
  def dtype(self):
    return jnp.bfloat16 if self.config.model.dtype == 'bfloat16' else jnp.float32

  @property
  def choice(self) -> str:
    """The supernet's operator choice: ``config.model.choice``, or the platform's default
    (:func:`nar_jax.ops.default_choice`) when it is ``''``."""
    return self.config.model.choice or ops.default_choice(jax.devices()[0].platform)

  def network_args(self, num_classes: int | None = None) -> families.NetworkArgs:
    return families.NetworkArgs(num_classes or self.splits.num_classes, self.head, self.dtype,
                                self.choice, DATA_AXIS)

  def supernet(self):
    """The supernet over the search space, for the search data's classes."""
    return self.family.network(self.space, None, self.network_args())

  def fixed(self, arch: tuple[int, ...], num_classes: int | None = None):
    """The fixed network ``arch`` of the retrain space, for ``num_classes`` classes
    (default: the search data's)."""
    return self.family.network(self.retrain_space, self.retrain_space.validate(arch),
                               self.network_args(num_classes))

  @functools.cached_property
  def count_args(self) -> families.CountArgs:
    """The search data's input, and the classifier the task counts (none for faces)."""
    h, w, c = self.splits.image_shape
    return families.CountArgs((h, w), c, self.task.counted_classes(self.splits), self.head)

  def counts(self, arch) -> ops.Counts:
    """Parameters and MACs of the fixed network ``arch`` (:attr:`count_args`)."""
    return self.family.counts(self.retrain_space, arch, self.count_args)

  def policy(self, search: str | None = None) -> policy_lib.Policy:
    """The controller policy over the space (``search``: the family's default when
    ``None``; the alternating search's ``'operators'`` / ``'skips'``)."""
    c = self.config.search.controller
    if search is None:
      return self.family.policy(self.space, c)
    return self.family.policy(self.space, c, search)

  @property
  def used_mask(self):
    """Which supernet leaves an architecture uses (:func:`nar_jax.train.make_train_step`)."""
    return self.family.used_mask(self.space)

  @functools.cached_property
  def cost(self) -> reinforce.CostReward | None:
    """The resource-aware reward of ``config.search.cost``, or ``None`` (accuracy alone)."""
    cfg = self.config.search.cost
    if cfg.target_macs == 0:
      return None
    target = cfg.target_macs
    if target <= 1:
      target *= self.counts(self.space.baseline()).macs
    return reinforce.CostReward(self.family.macs_model(self.retrain_space, self.count_args),
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
  def node_names(self) -> list[str]:
    return self.family.node_names(self.space)

  def arch_text(self, arch) -> str:
    """An architecture (op indices or readable) on one line."""
    return families.arch_text(self.family, self.space.names(arch))

  def parse_arch(self, text: str) -> tuple[int, ...]:
    """``config.arch`` as a validated architecture: ``'baseline'``, the path of an
    ``arch.json`` (its ``arch``), a JSON list (op names, or for the joint space the
    readable layers or the flat vector), or the family's comma-separated form."""
    text = text.strip()
    if text == 'baseline':
      return self.space.baseline()
    if text.endswith('.json'):
      text = config_lib.expand_path(text)
      if not os.path.exists(text):
        raise ValueError(f'config.arch names {text}, which does not exist')
      return self.space.validate(files.read_json(text)['arch'])
    if text.startswith('['):
      return self.space.validate(json.loads(text))
    return self.family.parse_arch(self.space, [e.strip() for e in text.split(',')])
