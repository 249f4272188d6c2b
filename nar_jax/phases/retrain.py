"""Retraining: a fixed network trained from scratch on train + valid, then judged by the
task (test accuracy; verification for face networks)."""

from __future__ import annotations

from typing import Any

from nar_jax import data, tasks, train
from nar_jax.phases import loop
from nar_jax.phases.context import Context, Networks


def evaluator(ctx: Context, phase: str) -> tasks.Evaluator:
  """The task's measuring tools for ``phase``, on the run's mesh and eval batch size."""

  def accuracy(model, variables, split, splits):
    eval_fn = train.make_eval_step(model, ctx.mesh, mean=splits.mean, std=splits.std)
    return loop.evaluate_split(eval_fn, variables, split, ctx.config.eval_batch_size, ctx.mesh)

  def embedder(model, variables, splits):
    embed = train.make_embed_step(model, ctx.mesh, mean=splits.mean, std=splits.std)
    return lambda images: embed(variables, train.shard_whole(ctx.mesh, images))

  return tasks.Evaluator(ctx.config, ctx.workdir, phase, ctx.log, accuracy, embedder)


def run(ctx: Context, nets: Networks, name: str, arch: tuple[int, ...]) -> dict[str, Any]:
  """Trains the fixed network ``arch`` from scratch on train + valid of the task's
  retraining data (phase ``retrain_<name>``, checkpointed under
  ``checkpoints/retrain_<name>``); returns what the task measures of it
  (``test_acc``, ``test_loss``; faces also ``verification``), ``arch``,
  ``final_train_acc`` and the median ``step_s``."""
  phase = f'retrain_{name}'
  cfg = ctx.config.retrain
  splits = nets.task.retrain_splits(ctx.config, ctx.workdir, nets.splits)
  split = data.merge(splits.train, splits.valid)
  per_epoch = data.num_batches(split, cfg.batch_size)
  tx = train.child_optimizer(cfg.optimizer, per_epoch)
  model = nets.fixed(arch, splits.num_classes)
  state = train.replicate(ctx.mesh, train.create_train_state(
      ctx.key(phase), model, splits.image_shape, tx, None))
  step_fn = train.make_train_step(model, tx, ctx.mesh, mean=splits.mean, std=splits.std,
                                  crop_padding=ctx.config.dataset.crop_padding,
                                  flip=ctx.config.dataset.flip, sample_arch=None)
  ev = evaluator(ctx, phase)

  def run_epoch(state, epoch, meta, progress):
    state, stats = loop.context_epoch(ctx, step_fn, state, split, cfg.batch_size, epoch,
                                      ctx.key(phase), None, progress, 'retrain.optimizer')
    ctx.log.record(phase=phase, epoch=epoch + 1, train_loss=stats['loss'],
                   train_acc=stats['accuracy'], step_s=stats['step_s'])
    every = cfg.verify_every_epochs
    if every and (epoch + 1) % every == 0 and epoch + 1 < cfg.epochs:
      nets.task.monitor(ev, model, state.variables, splits, epoch + 1)
    # The last epoch's accuracy travels in the checkpoint's meta: a run interrupted
    # after the last epoch (in the evaluation) trains no epoch when re-run.
    return state, {'step_times': meta['step_times'] + [stats['step_s']],
                   'final_train_acc': stats['accuracy']}

  state, meta = loop.run_epochs(ctx, phase, state, cfg.epochs, per_epoch, run_epoch)
  result = {'arch': nets.space.names(arch), 'test_acc': None, 'test_loss': None,
            'final_train_acc': meta.get('final_train_acc'),
            'step_s': loop.median(meta['step_times'])}
  result.update(nets.task.evaluate(ev, model, state.variables, splits))
  return result
