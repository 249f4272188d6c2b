"""The search: ENAS's alternation of a child epoch (controller-sampled architectures on
the shared weights) and controller updates (REINFORCE on their validation rewards).

``search.method='random'`` trains the shared weights on the untrained policy's
architectures (``policy.uniform``) and never updates the controller: random search.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np

from nar_jax import data, distributed, tasks, train
from nar_jax import policy as policy_lib
from nar_jax.errors import NonFiniteError
from nar_jax.phases import loop, supernet
from nar_jax.phases.context import Context, Networks


def controller_batches(ctx: Context, reward: tasks.RewardData, epoch: int,
                       update: int) -> tuple[np.ndarray, np.ndarray]:
  """One minibatch per architecture: ``(M, B, H, W, C)`` images and ``(M, B)`` labels, or
  for verification rewards ``B / 2`` pairs per architecture and ``(M, B / 2)`` issame.

  Of the images (and labels), only this process's rows of each minibatch
  (:func:`nar_jax.distributed.process_rows`) are read; issame is whole."""
  c = ctx.config.search.controller
  rng = np.random.default_rng([ctx.config.seed, epoch, update])
  per_target = reward.images_per_target
  index = np.stack([rng.choice(len(reward.targets), c.valid_batch_size // per_target,
                               replace=False) for _ in range(c.num_aggregate)])
  image_index = index if per_target == 1 else np.stack([2 * index, 2 * index + 1], -1).reshape(
      len(index), -1)
  rows = distributed.process_rows(c.valid_batch_size)
  if per_target == 1:
    return reward.images[image_index[:, rows]], reward.targets[index[:, rows]]
  return reward.images[image_index[:, rows]], reward.targets[index]


def controller_update(ctx: Context, nets: Networks, policy: policy_lib.Policy, ctrl_tx,
                      reward: tasks.RewardData) -> Callable:
  """The jitted controller update of ``policy`` with the config's reward and recipe."""
  c = ctx.config.search.controller
  return train.make_controller_update(
      nets.supernet(), ctrl_tx, ctx.mesh, policy=policy, mean=nets.splits.mean,
      std=nets.splits.std, entropy_weight=c.entropy_weight, baseline_decay=c.baseline_decay,
      batch_statistics=ctx.config.search.batch_statistics, reward=reward.kind, cost=nets.cost)


def controller_updates(ctx: Context, update_fn: Callable, ctrl: train.ControllerState,
                       variables: Any, reward: tasks.RewardData, epoch: int,
                       epoch_key: jax.Array, *args) -> tuple[train.ControllerState, list[dict]]:
  """One epoch's ``updates_per_epoch`` controller updates; returns the state and the
  fetched metrics of each update (``args``: the policy's extra arguments).

  Raises:
    NonFiniteError: an update's loss, gradient norm or reward was not finite (it was
      not applied).
  """
  pending = []
  for u in range(ctx.config.search.controller.updates_per_epoch):
    images, targets = controller_batches(ctx, reward, epoch, u)
    targets = (train.shard(ctx.mesh, targets, 1) if reward.images_per_target == 1
               else train.replicate(ctx.mesh, targets))
    ctrl, m = update_fn(ctrl, variables, train.shard(ctx.mesh, images, 1), targets,
                        jax.random.fold_in(epoch_key, u), *args)
    pending.append(m)
  fetched = jax.device_get(pending)
  for u, m in enumerate(fetched):
    if not bool(m.pop('finite')):
      lr = ctx.config.search.controller.lr
      raise NonFiniteError(
          f'[controller] non-finite loss, gradient norm or reward at epoch {epoch + 1} update '
          f'{u + 1} (reward {float(m["reward"]):.4g}, loss {float(m["controller_loss"]):.4g}). '
          'The update was not applied and nothing after the last checkpoint was saved. Try a '
          f'lower learning rate (config.search.controller.lr is {lr:g}; or the shared '
          "weights' config.child.optimizer.lr_max) with --config.allow_changes=<that field> "
          'added to the same command; the run then resumes from the last checkpoint.')
  return ctrl, fetched


def log_updates(ctx: Context, phase: str, epoch: int, metrics: list[dict],
                seconds: float) -> None:
  last = metrics[-1]
  ctx.log.info(f'[{phase}] epoch {epoch + 1}: {len(metrics)} controller updates in '
               f'{seconds:.1f} s | reward {last["reward"]:.4f} baseline '
               f'{last["baseline"]:.4f} entropy {last["entropy"]:.3f}')


def epoch_summary(epoch: int, stats: dict[str, float], updates: list[dict]) -> dict[str, Any]:
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


def initial_state(ctx: Context, policy: policy_lib.Policy, ctrl_tx,
                  child: train.TrainState) -> dict[str, Any]:
  """``{'child', 'controller'}``: the shared weights and a fresh controller."""
  ctrl = train.controller_state(policy.init(ctx.key('controller')), ctrl_tx)
  return {'child': child, 'controller': train.replicate(ctx.mesh, ctrl)}


def run(ctx: Context, nets: Networks, child: train.TrainState) -> tuple[dict[str, Any], dict]:
  """``search.epochs`` epochs, each a child epoch then the controller's updates;
  checkpointed under ``checkpoints/search``.

  Returns ``({'child': TrainState, 'controller': ControllerState}, meta)``: ``meta``
  holds ``step_times`` (the median supernet s/step of each search epoch) and ``curve``
  (:func:`epoch_summary` of each epoch).
  """
  c = ctx.config.search.controller
  ctrl_tx = train.controller_optimizer(c)
  policy = nets.policy()
  state = initial_state(ctx, policy, ctrl_tx, child)
  random_search = ctx.config.search.method == 'random'
  tx = supernet.child_optimizer(ctx, nets)
  k = ctx.config.search.archs_per_step
  if random_search:  # the untrained policy's architectures, no controller updates
    step_fn = supernet.child_step(ctx, nets, tx, lambda key, _: policy.uniform(key), k)
  else:
    step_fn = supernet.child_step(ctx, nets, tx,
                                  lambda key, params: policy.sample(params, key).arch, k)
  reward = nets.task.reward_data(ctx.config, ctx.workdir, nets.splits)
  update_fn = controller_update(ctx, nets, policy, ctrl_tx, reward)
  batch = ctx.config.child.batch_size

  def run_epoch(state, epoch, meta, progress):
    child, stats = loop.context_epoch(ctx, step_fn, state['child'], nets.splits.train, batch,
                                      epoch, ctx.key('search'), state['controller'].params,
                                      progress)
    ctx.log.record(phase='search', epoch=epoch + 1, train_loss=stats['loss'],
                   train_acc=stats['accuracy'], step_s=stats['step_s'])
    ctrl = state['controller']
    tick = time.time()
    epoch_key = jax.random.fold_in(ctx.key('controller'), epoch)
    ctrl, update_metrics = ((ctrl, []) if random_search else controller_updates(
        ctx, update_fn, ctrl, child.variables, reward, epoch, epoch_key))
    for u, m in enumerate(update_metrics):
      ctx.log.record(phase='controller', epoch=epoch + 1, update=u + 1, **m)
    if update_metrics:
      log_updates(ctx, 'search', epoch, update_metrics, time.time() - tick)
    return {'child': child, 'controller': ctrl}, {
        'step_times': meta['step_times'] + [stats['step_s']],
        'curve': meta.get('curve', []) + [epoch_summary(epoch, stats, update_metrics)]}

  return loop.run_epochs(ctx, 'search', state, ctx.config.search.epochs,
                         data.num_batches(nets.splits.train, batch), run_epoch)
