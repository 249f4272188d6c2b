"""The alternating search (:mod:`nar_jax.alternating`) on the supernet, from the joint
space's baseline architecture: operator phases and skip phases in turn."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from nar_jax import alternating, data, train
from nar_jax.phases import derive, loop, search, supernet
from nar_jax.phases.context import Context, Networks


def run(ctx: Context, nets: Networks, child: train.TrainState) -> tuple[dict[str, Any], list]:
  """Runs the alternation; returns a derive-like result and the supernet s/step of each epoch.

  Each alternating phase runs ``alternating.epochs_per_phase`` search epochs (a child
  epoch with architectures from the forced controller, then its updates; one joint
  controller and one set of shared weights throughout), then scores the phase's
  proposals on the validation split. Checkpointed after every phase
  (``checkpoints/alternating``); logs ``phase='alternating'`` records (the ER sequence)
  and controller records with ``search`` and ``round``. The result has ``best``,
  ``candidates`` of the last phase, ``baseline`` and ``alternating`` (history and stop
  reason).
  """
  cfg, c = ctx.config.alternating, ctx.config.search.controller
  ctrl_tx = train.controller_optimizer(c)
  policies = {s: nets.policy(s) for s in alternating.PHASES}
  state = search.initial_state(ctx, policies['operators'], ctrl_tx, child)
  tx = supernet.child_optimizer(ctx, nets)
  steps = {s: supernet.child_step(ctx, nets, tx,
                                  lambda key, p, s=s: policies[s].sample(p[0], key, p[1]).arch,
                                  ctx.config.search.archs_per_step)
           for s in alternating.PHASES}
  reward = nets.task.reward_data(ctx.config, ctx.workdir, nets.splits)
  updates = {s: search.controller_update(ctx, nets, policies[s], ctrl_tx, reward)
             for s in alternating.PHASES}
  eval_fn = supernet.eval_step(ctx, nets)
  batch = ctx.config.child.batch_size
  per_epoch = data.num_batches(nets.splits.train, batch)
  start = nets.space.baseline()

  def run_phase(state, index, meta, progress):
    history = meta.get('history', [])
    incumbent = tuple(history[-1]['op_indices']) if history else tuple(start)
    search_kind, round_ = alternating.phase_of(index)
    fixed = jnp.asarray(incumbent, jnp.int32)
    child, ctrl = state['child'], state['controller']
    step_times = list(meta['step_times'])
    for i in range(cfg.epochs_per_phase):
      epoch = index * cfg.epochs_per_phase + i
      child, stats = loop.context_epoch(ctx, steps[search_kind], child, nets.splits.train, batch,
                                        epoch, ctx.key('search'), (ctrl.params, fixed), progress)
      ctx.log.record(phase='search', epoch=epoch + 1, search=search_kind, round=round_,
                     train_loss=stats['loss'], train_acc=stats['accuracy'],
                     step_s=stats['step_s'])
      step_times.append(stats['step_s'])
      tick = time.time()
      ctrl, metrics = search.controller_updates(
          ctx, updates[search_kind], ctrl, child.variables, reward, epoch,
          jax.random.fold_in(ctx.key('controller'), epoch), fixed)
      for u, m in enumerate(metrics):
        ctx.log.record(phase='controller', epoch=epoch + 1, update=u + 1, search=search_kind,
                       round=round_, **m)
      if metrics:
        search.log_updates(ctx, f'alternating {search_kind} {round_}', epoch, metrics,
                           time.time() - tick)
    proposals = alternating.propose(policies[search_kind], ctrl.params, incumbent,
                                    jax.random.fold_in(ctx.key('derive'), index), cfg.num_samples)
    candidates = derive.score_proposals(ctx, nets, eval_fn, child.variables, proposals,
                                        f'alternating {search_kind} {round_}')
    entry = alternating.select(search_kind, round_, incumbent, candidates, cfg.tolerance)
    history = history + [entry]
    ctx.log.info(f'[alternating] {entry["phase"]} phase of round {entry["round"]}: ER '
                 f'{entry["er"]:.4f} (incumbent {entry["incumbent_reward"]:.4f}, '
                 f'{"improved" if entry["improved"] else "kept the incumbent"})')
    ctx.log.record(phase='alternating', step=len(history), search=entry['phase'],
                   round=entry['round'], er=entry['er'],
                   incumbent_reward=entry['incumbent_reward'], improved=entry['improved'],
                   arch=entry['op_indices'])
    return {'child': child, 'controller': ctrl}, {'step_times': step_times, 'history': history}

  if cfg.max_rounds <= 0:
    raise ValueError(f'max_rounds must be positive, got {cfg.max_rounds}')
  state, meta = loop.run_epochs(
      ctx, 'alternating', state, 2 * cfg.max_rounds, cfg.epochs_per_phase * per_epoch, run_phase,
      epochs_per_unit=cfg.epochs_per_phase,
      finished=lambda meta: alternating.stop_reason(meta.get('history', []),
                                                    cfg.max_rounds) is not None)
  history = meta['history']
  stopped = alternating.stop_reason(history, cfg.max_rounds)
  ctx.log.info(f'[alternating] stopped ({stopped}) after {len(history)} phases; ER sequence '
               f'{[round(h["er"], 4) for h in history]}')
  last = history[-1]
  best = next(cand for cand in last['candidates'] if cand['op_indices'] == last['op_indices'])
  summary = [{k: v for k, v in h.items() if k != 'candidates'} for h in history]
  return {'best': best, 'candidates': last['candidates'],
          'baseline': derive.baseline_entry(ctx, nets, eval_fn, state['child'].variables),
          'alternating': {'history': summary, 'stopped': stopped}}, meta['step_times']
