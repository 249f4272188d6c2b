"""Derive: the searched architecture, chosen among the controller's proposals by their
score with the shared weights on the whole validation split."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from nar_jax.phases import supernet
from nar_jax.phases.context import Context, Networks


class Proposal(NamedTuple):
  """A proposal that is not a controller sample (random search): ``log_prob`` 0."""

  arch: jax.Array
  log_prob: float


def score_proposals(ctx: Context, nets: Networks, eval_fn: Callable, variables: Any,
                    proposals: list[tuple[str, Any]], phase: str) -> list[dict[str, Any]]:
  """Scores ``(source, sample)`` proposals (``sample.arch``, ``sample.log_prob``) on the
  whole validation split with the shared weights (``eval_fn``:
  :func:`nar_jax.phases.supernet.eval_step`), dropping repeated architectures.

  Returns one dict per distinct architecture: ``source``, ``arch`` (readable),
  ``op_indices`` (the vector), ``log_prob``, ``valid_acc``, ``macs`` and ``score``
  (:meth:`Networks.score`, what derive ranks by).
  """
  seen, candidates = set(), []
  for source, s in proposals:
    arch = tuple(int(a) for a in jax.device_get(s.arch))
    if arch in seen:
      continue
    seen.add(arch)
    valid_acc = supernet.valid_accuracy(ctx, nets, eval_fn, variables, arch)
    macs = nets.counts(arch).macs
    candidates.append({'source': source, 'arch': nets.space.names(arch), 'op_indices': list(arch),
                       'log_prob': float(s.log_prob), 'valid_acc': valid_acc,
                       'macs': macs, 'score': nets.score(valid_acc, macs)})
    ctx.log.info(f'[{phase}] {source}: valid acc {valid_acc:.4f} score '
                 f'{candidates[-1]["score"]:.4f} MACs {macs:,} {nets.arch_text(arch)}')
  return candidates


def baseline_entry(ctx: Context, nets: Networks, eval_fn: Callable,
                   variables: Any) -> dict[str, Any]:
  """The base network's readable architecture and its score with the shared weights."""
  baseline = nets.space.baseline()
  return {'arch': nets.space.names(baseline),
          'valid_acc': supernet.valid_accuracy(ctx, nets, eval_fn, variables, baseline)}


def run(ctx: Context, nets: Networks, search: dict[str, Any]) -> dict[str, Any]:
  """Scores the controller's most likely and ``num_samples`` sampled architectures on the
  whole validation split with the shared weights; keeps the best score (first on ties).

  Random search (``search.method='random'``) scores ``num_samples`` architectures of the
  untrained policy (``policy.uniform``) instead: the best of N random architectures.
  """
  policy = nets.policy()
  params = search['controller'].params
  keys = jax.random.split(ctx.key('derive'), ctx.config.derive.num_samples)
  if ctx.config.search.method == 'random':
    proposals = [(f'random_{i}', Proposal(policy.uniform(k), 0.0)) for i, k in enumerate(keys)]
  else:
    proposals = [('most_likely', policy.most_likely(params))]
    proposals += [(f'sample_{i}', policy.sample(params, k)) for i, k in enumerate(keys)]
  variables = search['child'].variables
  eval_fn = supernet.eval_step(ctx, nets)
  candidates = score_proposals(ctx, nets, eval_fn, variables, proposals, 'derive')
  best = max(candidates, key=lambda cand: cand['score'])
  return {'best': best, 'candidates': candidates,
          'baseline': baseline_entry(ctx, nets, eval_fn, variables)}
