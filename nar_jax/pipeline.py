"""The NAR pipeline: pretrain -> search -> derive -> retrain -> report.

Each phase (:mod:`nar_jax.phases`) checkpoints its own state and records its result in
``<workdir>/results/<phase>.json`` when it finishes, so running the same command again
continues an interrupted phase from its last checkpoint and skips finished ones. All
randomness is derived from ``config.seed`` and the (phase, epoch, step) position, so a
resumed run computes what an uninterrupted run computes.

Outputs in the workdir: ``config.json``, ``arch.json``, ``metrics.jsonl``, ``report.md``,
``report.json``, ``checkpoints/``, ``results/``, ``tensorboard/`` (the records of
``metrics.jsonl``, the config and the report as TensorBoard events: :mod:`nar_jax.tensorboard`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from nar_jax import config as config_lib
from nar_jax import distributed, files, report, train
from nar_jax import workdir as workdir_lib
from nar_jax.workdir import CONFIG_FILE, write_config  # noqa: F401  (the workdir's config.json)
from nar_jax.phases import alternating, derive, loop, pretrain, retrain, search
from nar_jax.phases.context import Context, Networks
from nar_jax.progress import Log

def setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[Context, Networks]:
  """Validates the config, writes it to ``<workdir>/config.json`` (:data:`CONFIG_FILE`)
  and builds the run (mesh, log, keys) and its networks (data, space)."""
  config_lib.validate(config)
  mesh = train.make_mesh(config.num_devices)
  for name in ('child.batch_size', 'retrain.batch_size', 'search.controller.valid_batch_size',
               'eval_batch_size'):
    train.check_batch_size(config_lib.field(config, name), mesh, f'config.{name}')
  try:
    train.check_archs_per_step(config.search.archs_per_step, mesh)
  except ValueError as e:
    raise ValueError(f'config.search.archs_per_step: {e}') from None
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_main_process():
    write_config(config, workdir)
  ctx = Context(config, workdir, mesh, Log(workdir), jax.random.PRNGKey(config.seed))
  nets = Networks.of(config, workdir)
  splits = nets.splits
  searched = () if config.arch else (
      ('child.batch_size', splits.train, config.child.batch_size),
      ('search.controller.valid_batch_size', splits.valid,
       config.search.controller.valid_batch_size))
  for name, split, batch in searched:  # only a search uses them
    if batch > len(split):
      raise ValueError(f'config.{name}={batch} exceeds the {len(split)} examples of its split')
  ctx.log.info(f'{config.dataset.name}: train {len(splits.train)}, valid {len(splits.valid)}, '
               f'test {len(splits.test)}, image {splits.image_shape}, {splits.num_classes} classes')
  ctx.log.info(f'search space {nets.space.name} (width {config.model.width}): '
               f'{nets.space.num_nodes} nodes; devices: {mesh.devices.size} x '
               f'{mesh.devices.flat[0].platform}')
  return ctx, nets


def cached(ctx: Context, phase: str, fn: Callable[[], dict]) -> dict:
  """Runs a phase unless its result is already recorded."""
  result = ctx.results.load(phase)
  if result is not None:
    ctx.log.info(f'[{phase}] already done ({ctx.results.path(phase)})')
    return result
  result = fn()
  ctx.results.save(phase, result)
  return result


def searched(ctx: Context, nets: Networks) -> dict:
  """Pretrain, search and derive (or the alternating search); returns the derive result."""

  def search_and_derive():
    tick = time.time()
    shared = pretrain.run(ctx, nets)
    if ctx.config.search.method == 'alternating':
      result, step_times = alternating.run(ctx, nets, shared)
    else:
      state, meta = search.run(ctx, nets, shared)
      step_times = meta['step_times']
      result = derive.run(ctx, nets, state)
      result['search_curve'] = meta.get('curve', [])
      result['uniform_entropy'] = float(np.sum(np.log(nets.mask.sum(axis=1))))
    result['search_seconds'] = time.time() - tick
    result['supernet_step_s'] = loop.median(step_times)
    return result

  return cached(ctx, 'derive', search_and_derive)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole pipeline; returns the report dict. The run holds the
  workdir (:func:`nar_jax.workdir.claim`: writable, locked, its config.json's config)."""
  workdir = config_lib.expand_path(workdir)
  with workdir_lib.claim(config, workdir):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  ctx, nets = setup(config, workdir)
  try:
    ctx.log.text('config', f'```\n{config}\n```')
    baseline = nets.space.baseline()
    if config.arch:
      arch = nets.parse_arch(config.arch)
      derived = None
    else:
      derived = searched(ctx, nets)
      arch = nets.space.validate(derived['best']['arch'])
    if distributed.is_main_process():
      files.write_json(os.path.join(workdir, 'arch.json'), {
          'space': nets.space.name, 'nodes': nets.node_names,
          'arch': nets.space.names(arch), 'op_indices': list(arch),
          'valid_acc': derived['best']['valid_acc'] if derived else None,
          'source': derived['best']['source'] if derived else 'config.arch',
      })
    refined = cached(ctx, 'retrain_refined', lambda: retrain.run(ctx, nets, 'refined', arch))
    if arch == baseline:
      base = refined
    elif config.retrain.baseline:
      base = cached(ctx, 'retrain_baseline', lambda: retrain.run(ctx, nets, 'baseline', baseline))
    else:
      base = None  # Not retrained: the report shows no baseline test accuracy.
    result = report.build(nets, arch, derived, refined, base)
    if distributed.is_main_process():
      report.write(workdir, result, nets.family)
      with open(os.path.join(workdir, 'report.md')) as f:
        ctx.log.text('report', f.read())
  finally:
    ctx.log.close()
  ctx.log.info(f'report: {os.path.join(workdir, "report.md")}')
  return result
