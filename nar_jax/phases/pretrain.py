"""PreTrain (the paper): the shared weights trained with uniformly random architectures."""

from __future__ import annotations

from nar_jax import data, train
from nar_jax.phases import loop, supernet
from nar_jax.phases.context import Context, Networks


def run(ctx: Context, nets: Networks) -> train.TrainState:
  """``config.pretrain.epochs`` epochs of uniformly random architectures (none: the
  initial shared weights); checkpointed under ``checkpoints/pretrain``."""
  tx = supernet.child_optimizer(ctx, nets)
  state = supernet.initial_state(ctx, nets, tx)
  epochs = ctx.config.pretrain.epochs
  if epochs == 0:
    return state
  uniform = nets.policy().uniform
  step_fn = supernet.child_step(ctx, nets, tx, lambda key, _: uniform(key))
  batch = ctx.config.child.batch_size

  def run_epoch(state, epoch, meta, progress):
    state, stats = loop.context_epoch(ctx, step_fn, state, nets.splits.train, batch, epoch,
                                      ctx.key('pretrain'), None, progress)
    ctx.log.record(phase='pretrain', epoch=epoch + 1, train_loss=stats['loss'],
                   train_acc=stats['accuracy'], step_s=stats['step_s'])
    return state, {'step_times': meta['step_times'] + [stats['step_s']]}

  state, _ = loop.run_epochs(ctx, 'pretrain', state, epochs,
                             data.num_batches(nets.splits.train, batch), run_epoch)
  return state
