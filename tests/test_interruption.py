"""Interruption in every phase: a run interrupted anywhere, then re-run, ends as an
uninterrupted run ends.

For each space (the tiny ResNet of tests/test_pipeline.py, the face smoke run with
verification, the joint NAS-Arch space and its alternating search) the test runs the
pipeline once uninterrupted (the reference), then once more in a second workdir as a
chain of runs: the first is interrupted at a random event (a seeded RNG) of the first
phase, the re-run continues and is interrupted inside the next phase, and so on through
every phase the reference went through; a last clean re-run finishes. Its arch.json,
report.json, results/*.json and report.md must equal the reference's, timings aside.

Events are the calls of what the phases build from :mod:`nar_jax.train` (train steps,
controller updates, eval batches, embedding batches) and :func:`nar_jax.report.markdown`
(inside :func:`nar_jax.report.write`); each is attributed to the phase whose ``run`` is
executing (:mod:`nar_jax.phases`), and evaluation events inside a retraining to its
``evaluate_<network>`` step (test accuracy, verification). The interrupting exception is
raised before the event runs, so the disk at that moment must look exactly as it looked
at the same event of the reference (checkpoints, results, outputs), and the re-run must
redo exactly the events after the last checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import zlib

import numpy as np
import pytest

from nar_jax import pipeline, report, train
from nar_jax.phases import alternating, derive, pretrain, retrain, search

from config_testing import load_config
from test_faces_pipeline import smoke_config as face_smoke_config
from test_pipeline import run_tiny, tiny_config
from test_search_pipeline import tiny as tiny_macro

TIMING_FIELDS = frozenset({'seconds', 'search_seconds', 'supernet_step_s',
                           'supernet_over_fixed_step', 'retrain_step_s', 'step_s'})
"""The wall-clock fields of report.json and results/*.json (measured, so never equal)."""
TIMING_LINES = ('| retrain s/step |', 'Search (pretrain + search + derive) took')
"""The report.md lines that print them."""


class Interrupted(Exception):
  """What the test raises inside a phase."""


def checkpoint_steps(workdir: str) -> dict[str, list[int]]:
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return {}
  return {phase: sorted(int(d) for d in os.listdir(os.path.join(root, phase)) if d.isdigit())
          for phase in sorted(os.listdir(root))}


def disk_state(workdir: str) -> dict:
  """What a run has left on disk: checkpoint steps per phase, results, outputs."""
  results = os.path.join(workdir, 'results')
  return {'checkpoints': checkpoint_steps(workdir),
          'results': sorted(os.listdir(results)) if os.path.isdir(results) else [],
          'outputs': [f for f in ('arch.json', 'report.json', 'report.md')
                      if os.path.exists(os.path.join(workdir, f))]}


def group_of(phase: str, kind: str) -> str:
  """The chain's step an event belongs to: its phase, or ``evaluate_<network>`` for the
  evaluation (test accuracy, verification) after a retraining."""
  if phase.startswith('retrain_') and kind in ('eval', 'embed'):
    return 'evaluate_' + phase[len('retrain_'):]
  return phase


def checkpointed_as(group: str) -> str:
  """The checkpoint directory a chain step resumes from."""
  return 'retrain_' + group[len('evaluate_'):] if group.startswith('evaluate_') else group


class Events:
  """Counts the events of each chain step of one run; records the disk state before each
  (``record``) and raises :class:`Interrupted` before the ``arm = (group, k)``-th."""

  def __init__(self, workdir: str, record: bool = False, arm: tuple[str, int] | None = None):
    self.workdir, self.record, self.arm = workdir, record, arm
    self.phase = None
    self.order = []  # the chain steps in the order they first ran
    self.counts = collections.Counter()
    self.states = {}  # (group, k) -> disk_state before the event
    self.fired = None

  def event(self, kind: str) -> None:
    assert self.phase is not None, f'a {kind} event outside every phase'
    group = group_of(self.phase, kind)
    if group not in self.counts:
      self.order.append(group)
    self.counts[group] += 1
    at = (group, self.counts[group])
    if self.record:
      self.states[at] = disk_state(self.workdir)
    if at == self.arm:
      self.fired = (at, disk_state(self.workdir))
      raise Interrupted(f'interrupted before event {at[1]} of {group}')


@contextlib.contextmanager
def instrumented(events: Events):
  """Routes the events of every phase through ``events`` while inside."""
  mp = pytest.MonkeyPatch()

  def counted_factory(module, name, kind):
    make = getattr(module, name)

    def factory(*args, **kwargs):
      fn = make(*args, **kwargs)

      def counted(*a, **k):
        events.event(kind)
        return fn(*a, **k)

      return counted

    mp.setattr(module, name, factory)

  def phase_entry(module, name_of):
    run = module.run

    def entered(*args, **kwargs):
      events.phase = name_of(*args)
      try:
        return run(*args, **kwargs)
      finally:
        events.phase = None

    mp.setattr(module, 'run', entered)

  try:
    for name, kind in (('make_train_step', 'train'), ('make_controller_update', 'controller'),
                       ('make_eval_step', 'eval'), ('make_embed_step', 'embed')):
      counted_factory(train, name, kind)
    for module, phase in ((pretrain, 'pretrain'), (search, 'search'), (derive, 'derive'),
                          (alternating, 'alternating')):
      phase_entry(module, lambda *a, phase=phase: phase)
    phase_entry(retrain, lambda ctx, nets, name, arch: f'retrain_{name}')

    write, markdown = report.write, report.markdown

    def writing(*args, **kwargs):
      events.phase = 'report'
      try:
        return write(*args, **kwargs)
      finally:
        events.phase = None

    def counted_markdown(*args, **kwargs):  # after report.json, before report.md
      events.event('write')
      return markdown(*args, **kwargs)

    mp.setattr(report, 'write', writing)
    mp.setattr(report, 'markdown', counted_markdown)
    yield
  finally:
    mp.undo()


def without_timings(value):
  if isinstance(value, dict):
    return {k: without_timings(v) for k, v in value.items() if k not in TIMING_FIELDS}
  if isinstance(value, list):
    return [without_timings(v) for v in value]
  return value


def outcome(workdir: str) -> dict:
  """What a finished run's result is, timings aside."""
  def read(path):
    with open(os.path.join(workdir, path)) as f:
      return json.load(f) if path.endswith('.json') else f.read()

  results = sorted(os.listdir(os.path.join(workdir, 'results')))
  md = [line for line in read('report.md').splitlines()
        if not any(t in line for t in TIMING_LINES)]
  return {'arch': read('arch.json'), 'report': without_timings(read('report.json')),
          'results': {r: without_timings(read(f'results/{r}')) for r in results},
          'report_md': md}


def resnet_space():
  return tiny_config(), run_tiny


def face_space():
  # Two candidate ops and one retrained network (the ResNet space retrains both):
  # compiling IR networks is slow.
  config = face_smoke_config(**{'model.ops': 'conv3x3,max3x3', 'retrain.baseline': False,
                                'retrain.epochs': 1, 'search.controller.updates_per_epoch': 2})
  return config, pipeline.run


def joint_space():
  return tiny_macro(load_config('cifar_nasarch', 'smoke')), pipeline.run


def alternating_space():
  config = tiny_macro(load_config('cifar_alternating', 'smoke'))
  config.model.num_layers = 2  # as tests/test_search_pipeline.py's alternating smoke run
  config.alternating.max_rounds = 1
  config.alternating.num_samples = 2
  config.search.controller.updates_per_epoch = 2
  return config, pipeline.run


SPACES = {'resnet': resnet_space, 'faces': face_space, 'joint': joint_space,
          'alternating': alternating_space}
EXPECTED_CHAINS = {
    'resnet': ('pretrain', 'search', 'derive', 'retrain_refined', 'evaluate_refined', 'report'),
    'faces': ('search', 'derive', 'retrain_refined', 'evaluate_refined', 'report'),
    'joint': ('search', 'derive', 'retrain_refined', 'evaluate_refined', 'report'),
    'alternating': ('alternating', 'retrain_refined', 'evaluate_refined', 'report'),
}
"""The chain steps every run of the space has (a refined architecture that differs
from the baseline adds retrain_baseline and evaluate_baseline where it is retrained;
the smoke configs of the face and joint spaces do not pretrain)."""


@pytest.mark.parametrize('space', list(SPACES))
def test_interrupted_in_every_phase_then_rerun_gives_the_uninterrupted_result(
    space, tmp_path, capsys, compile_cache):
  config, run = SPACES[space]()
  reference_dir, chained_dir = str(tmp_path / 'reference'), str(tmp_path / 'chained')
  reference = Events(reference_dir, record=True)
  with instrumented(reference):
    run(config, reference_dir)
  chain = reference.order
  assert set(EXPECTED_CHAINS[space]) <= set(chain), chain
  assert chain[-1] == 'report', chain

  rng = np.random.default_rng(zlib.crc32(space.encode()))
  previous = None  # (group, k) of the last interruption
  arms = [(g, int(rng.integers(1, reference.counts[g] + 1))) for g in chain]
  for arm in arms + [None]:
    events = Events(chained_dir, arm=arm)
    capsys.readouterr()
    with instrumented(events):
      if arm is None:
        run(config, chained_dir)
      else:
        with pytest.raises(Interrupted):
          run(config, chained_dir)
    out = capsys.readouterr().out
    # Nothing finished before was done again.
    assert set(events.counts) <= {at[0] for at in (previous, arm) if at}, (
        arm, events.counts)
    if arm is not None:
      # Interrupted inside the intended step, with the disk as the reference had it then.
      assert events.fired is not None and events.fired[0] == arm, (arm, events.fired)
      assert events.fired[1] == reference.states[arm], arm
      assert disk_state(chained_dir) == reference.states[arm], arm
    if previous is not None:
      # The re-run continued the interrupted step from its last checkpoint: it redid
      # exactly the events after it.
      group, k = previous
      phase = checkpointed_as(group)
      saved = reference.states[previous]['checkpoints'].get(phase)
      first_after_save = min(j for j in range(1, k + 1)
                          if reference.states[(group, j)]['checkpoints'].get(phase) == saved)
      assert events.counts[group] == reference.counts[group] - (first_after_save - 1), (
          previous, events.counts[group], first_after_save)
      if saved:
        assert f'[{phase}] resumed from' in out, previous
    previous = arm

  assert outcome(chained_dir) == outcome(reference_dir)
