"""Alternating operator / skip search: the paper's general framework (section 3.3, eq. 9-11).

NAR fixes a network's skip connections and searches its operators. The paper's
general scheme alternates that with the converse: starting from a base architecture
``a^0 = (O^0, S^0)``,

* an **operator phase** searches ``O`` with the skips fixed to the incumbent's
  (eq. 9: ``pi_O(O | S^{k-1})``; the controller's skip decisions are forced, only
  the operators' log-probabilities enter the loss);
* a **skip phase** searches ``S`` with the operators fixed to the incumbent's
  (eq. 10: ``pi_S(S | O^k)``; operator decisions forced, loss = REINFORCE on the
  skips' log-probabilities + ENAS's KL skip penalty);

each phase starting from the previous phase's kept architecture, until the expected
reward stops improving (eq. 11: ``ER_O^1 <= ER_S^1 <= ER_O^2 <= ...``).

**Expected reward, precisely.** A phase ends by scoring candidates with a reward
``R`` (the pipeline: accuracy on the whole validation split with the shared
weights as they are at the end of the phase): the incumbent ``a^prev`` (always a
candidate), the controller's most likely architecture and ``num_samples``
architectures sampled from it (both with the other half forced). The phase keeps
the best proposal if it beats the incumbent's ``R`` by more than ``tolerance``,
else the incumbent. ``ER`` of the phase is ``R`` of the kept architecture. Since the
incumbent is a candidate, ``ER >= R(a^prev)``; when ``R`` is stationary (a planted
reward, or fixed shared weights) ``R(a^prev)`` is the previous phase's ``ER`` and the
logged sequence never decreases, which is eq. 11's argument. In a real search the
shared weights keep training between phases, so ``R(a^prev)`` is re-measured
(``incumbent_reward`` in the history) and may differ from the previous ``ER`` by
that drift.

**Stopping.** The loop stops when an operator phase and a skip phase in a row kept
their incumbent (neither half can improve it: a fixed point of the alternation),
or after ``max_rounds`` rounds (one round = an operator phase then a skip phase).

The loop (:func:`alternate`) is independent of how phases train and score, so a
test can drive it with a planted reward through real controller updates;
:func:`nar_jax.phases.alternating.run` takes the same steps (:func:`phase_of`,
:func:`select`, :func:`stop_reason`) with the supernet, one checkpointed unit per phase.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from nar_jax.policy import Policy

PHASES = ('operators', 'skips')
"""Phase order within a round."""

Candidate = dict[str, Any]
"""A scored architecture: ``source`` (str), ``arch`` (readable form), ``op_indices``
(the flat vector as a list of ints), ``valid_acc`` (its reward ``R``), ..."""


def phase_of(index: int) -> tuple[str, int]:
  """``(search, round)`` of the ``index``-th phase (0-based): operators first, rounds from 1."""
  return PHASES[index % 2], index // 2 + 1


def propose(policy: Policy, params: Any, incumbent: Sequence[int], key: jax.Array,
            num_samples: int) -> list[tuple[str, Any]]:
  """A phase's proposals from ``policy`` (forced to ``incumbent``): ``(source, sample)``
  pairs for the incumbent itself (scored by the controller), the most likely
  architecture and ``num_samples`` sampled ones; ``sample.arch`` / ``sample.log_prob``.
  One compiled call per (policy, ``num_samples``)."""
  current, likely, samples = _proposer(policy, num_samples)(
      params, jnp.asarray(incumbent, jnp.int32), key)
  return [('incumbent', current), ('most_likely', likely)] + [
      (f'sample_{i}', jax.tree.map(lambda x, i=i: x[i], samples)) for i in range(num_samples)]


@functools.cache
def _proposer(policy: Policy, num_samples: int):

  @jax.jit
  def proposals(params, arch, key):
    keys = jax.random.split(key, num_samples)
    return (policy.score(params, arch, arch), policy.most_likely(params, arch),
            jax.vmap(lambda k: policy.sample(params, k, arch))(keys))

  return proposals


def select(search: str, round_: int, incumbent: Sequence[int], candidates: list[Candidate],
           tolerance: float) -> dict[str, Any]:
  """One phase's outcome from its scored ``candidates`` (the incumbent among them).

  Returns the history entry: ``phase`` (``search``), ``round``, ``er`` (reward of the
  kept architecture), ``incumbent_reward``, ``improved`` (the best other candidate
  beat the incumbent by more than ``tolerance``; it is then kept, first on ties),
  ``arch`` / ``op_indices`` / ``source`` of the kept architecture and every candidate.

  Raises:
    ValueError: the incumbent is not among the candidates.
  """
  incumbent = [int(a) for a in incumbent]
  own = [c for c in candidates if list(c['op_indices']) == incumbent]
  if not own:
    raise ValueError('the incumbent must be among the candidates a phase scores')
  others = [c for c in candidates if list(c['op_indices']) != incumbent]
  best = max(others, key=lambda c: c['valid_acc']) if others else None
  improved = best is not None and best['valid_acc'] - own[0]['valid_acc'] > tolerance
  kept = best if improved else own[0]
  return {'phase': search, 'round': round_, 'er': kept['valid_acc'],
          'incumbent_reward': own[0]['valid_acc'], 'improved': bool(improved),
          'arch': kept['arch'], 'op_indices': [int(a) for a in kept['op_indices']],
          'source': kept['source'], 'candidates': candidates}


def stop_reason(history: Sequence[dict[str, Any]], max_rounds: int) -> str | None:
  """``'converged'`` (the last two phases kept their incumbents), ``'max_rounds'``, or
  ``None`` to go on."""
  if len(history) >= 2 and not history[-1]['improved'] and not history[-2]['improved']:
    return 'converged'
  if len(history) >= 2 * max_rounds:
    return 'max_rounds'
  return None


def alternate(start: Sequence[int], run_phase: Callable[[str, tuple[int, ...], int, int],
                                                         list[Candidate]], *,
              tolerance: float, max_rounds: int, history: Sequence[dict[str, Any]] = (),
              on_phase: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None
              ) -> dict[str, Any]:
  """Runs the alternation from ``start`` (or continues ``history``, the entries of
  phases already done, as after a resumed run).

  Args:
    start: the base architecture's flat vector ``a^0``.
    run_phase: ``(search, incumbent, round, index) -> candidates``: trains the
      controller (and whatever else) for one phase with the other half forced to
      ``incumbent``, and returns the scored candidates, the incumbent among them.
      ``index`` counts phases from 0.
    tolerance: how much a proposal must beat the incumbent by to replace it.
    max_rounds: at most this many (operator, skip) rounds.
    on_phase: called with each new history entry and the history so far (logging,
      checkpoints).

  Returns:
    ``{'arch': kept flat tuple, 'history': [entries of select], 'stopped':
    'converged' | 'max_rounds'}``; the ``er`` of the entries is the sequence
    ``ER_O^1, ER_S^1, ER_O^2, ...``.
  """
  if max_rounds <= 0:
    raise ValueError(f'max_rounds must be positive, got {max_rounds}')
  if tolerance < 0:
    raise ValueError(f'tolerance must be >= 0, got {tolerance}')
  history = list(history)
  while True:
    incumbent = tuple(history[-1]['op_indices']) if history else tuple(int(a) for a in start)
    reason = stop_reason(history, max_rounds)
    if reason is not None:
      return {'arch': incumbent, 'history': history, 'stopped': reason}
    search, round_ = phase_of(len(history))
    candidates = run_phase(search, incumbent, round_, len(history))
    history.append(select(search, round_, incumbent, candidates, tolerance))
    if on_phase is not None:
      on_phase(history[-1], history)
