"""The retrained networks of a finished run, restored for analysis (notebooks, scripts).

``retrained_network(config, workdir)`` rebuilds the refined (or baseline) fixed network of
a run exactly as retraining built it and restores its last checkpoint;
``verification_distances`` embeds a face run's pair set with it (insightface's protocol:
image plus mirror image, L2-normalised) and returns the squared distances of the pairs,
from which :func:`nar_jax.verification.evaluate` computes accuracy and the ROC (``tpr`` /
``fpr`` over thresholds).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from nar_jax import config as config_lib
from nar_jax import data, pipeline, train, verification
from nar_jax.checkpoint import PhaseCheckpoints
from nar_jax.data import faces
from nar_jax.phases.context import Context, Networks
from nar_jax.tasks import faces as face_task


class Retrained(NamedTuple):
  """A restored fixed network: its run (mesh, config), networks (data, space), module,
  variables and architecture."""

  ctx: Context
  nets: Networks
  model: Any
  variables: Any
  arch: tuple[int, ...]


def retrained_network(config: ml_collections.ConfigDict, workdir: str,
                      name: str = 'refined') -> Retrained:
  """The last checkpoint of ``retrain_<name>`` (``'refined'`` or ``'baseline'``).

  A run whose refined network is the baseline retrained it once, as ``retrain_refined``;
  ``name='baseline'`` then restores that one.

  Raises:
    ValueError: unknown `name`, or the run has not retrained that network.
  """
  if name not in ('refined', 'baseline'):
    raise ValueError(f"name must be 'refined' or 'baseline', got {name!r}")
  workdir = config_lib.expand_path(workdir)
  arch_path = os.path.join(workdir, 'arch.json')
  if not os.path.exists(arch_path):
    raise ValueError(f'{workdir} has no arch.json: run the pipeline there first')
  ctx, nets = pipeline.setup(config, workdir)
  with open(arch_path) as f:
    refined = nets.space.validate(json.load(f)['op_indices'])
  arch = refined if name == 'refined' else nets.space.baseline()
  phase = 'retrain_refined' if arch == refined else f'retrain_{name}'
  splits = nets.task.retrain_splits(config, workdir, nets.splits)
  cfg = config.retrain
  per_epoch = data.num_batches(data.merge(splits.train, splits.valid), cfg.batch_size)
  tx = train.child_optimizer(cfg.optimizer, per_epoch)
  model = nets.fixed(arch, splits.num_classes)
  state = train.replicate(ctx.mesh, train.create_train_state(
      ctx.key(phase), model, splits.image_shape, tx, None))
  ckpt = PhaseCheckpoints(workdir, phase)
  try:
    latest = ckpt.latest_step()
    if latest is None:
      raise ValueError(f'{workdir} has no checkpoint of {phase}: the run did not retrain the '
                       f'{name} network')
    state, _ = ckpt.restore(latest, state)
  finally:
    ckpt.close()
  return Retrained(ctx, nets, model, state.variables, arch)


def verification_distances(net: Retrained, pair_set: str) -> tuple[np.ndarray, np.ndarray]:
  """``(dist, issame)`` of the ``<pair_set>.bin`` of a face run's data directory.

  Returns:
    float64 (P,) squared L2 distances of the pairs' embeddings and bool (P,) issame;
    ``verification.evaluate`` of the same embeddings is what the pipeline reports.
  """
  ctx, splits = net.ctx, net.nets.splits
  embed = train.make_embed_step(net.model, ctx.mesh, mean=splits.mean, std=splits.std)
  directory = face_task.face_directory(ctx.config, ctx.workdir)
  pairs = faces.load_verification_set(os.path.join(directory, f'{pair_set}.bin'),
                                      splits.image_shape)
  embeddings = verification.embed_images(
      lambda x: embed(net.variables, train.shard_whole(ctx.mesh, x)), pairs.images,
      batch_size=ctx.config.eval_batch_size)
  return verification.pair_distances(embeddings), np.asarray(pairs.issame)
