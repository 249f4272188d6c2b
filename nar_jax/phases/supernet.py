"""The shared weights every search phase trains and scores: optimizer, steps, evaluation."""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from nar_jax import data, train
from nar_jax.phases import loop
from nar_jax.phases.context import Context, Networks


def child_optimizer(ctx: Context, nets: Networks):
  """The shared-weight optimizer (pretraining and search continue one schedule)."""
  steps_per_epoch = data.num_batches(nets.splits.train, ctx.config.child.batch_size)
  return train.child_optimizer(ctx.config.child.optimizer, steps_per_epoch)


def initial_state(ctx: Context, nets: Networks, tx) -> train.TrainState:
  """The supernet's initial variables and optimizer state, replicated on the mesh."""
  return train.replicate(ctx.mesh, train.create_train_state(
      ctx.key('init'), nets.supernet(), nets.splits.image_shape, tx,
      jnp.asarray(nets.space.baseline())))


def child_step(ctx: Context, nets: Networks, tx, sample_arch: Callable,
               archs_per_step: int = 1) -> Callable:
  """The supernet's train step with architectures from ``sample_arch(key, params)``,
  ``archs_per_step`` of them per step (:func:`nar_jax.train.make_train_step`; the
  search passes ``config.search.archs_per_step``)."""
  return train.make_train_step(
      nets.supernet(), tx, ctx.mesh, mean=nets.splits.mean, std=nets.splits.std,
      crop_padding=ctx.config.dataset.crop_padding, flip=ctx.config.dataset.flip,
      sample_arch=sample_arch, used_mask=nets.used_mask, archs_per_step=archs_per_step)


def eval_step(ctx: Context, nets: Networks) -> Callable:
  """The eval step that scores architectures with the shared weights (derive)."""
  return train.make_eval_step(nets.supernet(), ctx.mesh, mean=nets.splits.mean,
                              std=nets.splits.std,
                              batch_statistics=ctx.config.search.batch_statistics)


def valid_accuracy(ctx: Context, nets: Networks, eval_fn: Callable, variables: Any,
                   arch) -> float:
  """The accuracy of ``arch`` with the shared weights on the whole validation split."""
  scores = loop.evaluate_split(eval_fn, variables, nets.splits.valid,
                               ctx.config.eval_batch_size, ctx.mesh, jnp.asarray(arch))
  loop.check_finite_scores('derive', 'validation loss of an architecture (shared weights)',
                           {'loss': scores['loss'], 'accuracy': scores['accuracy']})
  return scores['accuracy']
