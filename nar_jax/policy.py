"""Controller policies as bundles of pure functions: what a search samples and learns.

A :class:`Policy` hides which controller a search uses behind one interface, so the
pipeline and the jitted steps (:mod:`nar_jax.train`) serve every search alike:

* :func:`operator_policy`: NAR's operator-only controller over a
  :class:`~nar_jax.space.SearchSpace` (the existing behaviour, same numerics);
* :func:`joint_policy`: ENAS's operator + skip controller over a
  :class:`~nar_jax.joint.JointSpace` (the NAS-Arch baseline), loss with the KL skip
  penalty;
* :func:`joint_policy` with ``search='operators'`` or ``'skips'``: one half of the
  alternating search (eq. 9-11, :mod:`nar_jax.alternating`): the other half's
  decisions are forced to an incumbent architecture passed as a traced argument.

Every function is pure and jits. The functions that sample or score take the policy's
extra arguments ``*args`` last: none for the free policies, the incumbent flat joint
architecture for the forced ones, so one compiled step serves every incumbent.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nar_jax import controller, joint, reinforce
from nar_jax.joint import JointSpace

SEARCHES = ('joint', 'operators', 'skips')


class Policy(NamedTuple):
  """A controller policy.

  Attributes:
    kind: ``'operators'`` (NAR) or ``'joint'`` (ENAS macro, possibly forced).
    search: what the controller decides: ``'operators'`` (NAR, or the alternating
      search's operator half), ``'skips'`` (its skip half) or ``'joint'`` (both).
    num_args: how many extra arguments the sampling and scoring functions take.
    init: ``(key) -> params``.
    sample: ``(params, key, *args) -> Sample`` (or ``JointSample``); ``.arch`` is the
      architecture vector the supernet reads.
    most_likely: ``(params, *args) -> Sample``.
    score: ``(params, arch, *args) -> Sample``, teacher-forced; differentiable.
    uniform: ``(key) -> arch``, a uniformly random architecture (pretraining).
    loss: ``(scored, advantages (M,)) -> scalar``, ``scored`` a batch of ``score``
      results for the ``M`` sampled architectures.
    diagnostics: ``(params, archs (M, ...), rewards (M,), advantages (M,), *args) ->
      dict`` of the eq. 6-7 / Figure 1 diagnostics (:mod:`nar_jax.reinforce`).
  """

  kind: str
  search: str
  num_args: int
  init: Callable[[jax.Array], Any]
  sample: Callable[..., Any]
  most_likely: Callable[..., Any]
  score: Callable[..., Any]
  uniform: Callable[[jax.Array], jax.Array]
  loss: Callable[[Any, jax.Array], jax.Array]
  diagnostics: Callable[..., dict[str, jax.Array]]


def _variant(controller_kind: str) -> controller.Variant:
  """The :class:`nar_jax.controller.Variant` named ``controller_kind``."""
  if controller_kind not in controller.VARIANTS:
    raise ValueError(f'unknown controller kind {controller_kind!r}; use one of '
                     f'{", ".join(controller.VARIANTS)}')
  return controller.VARIANTS[controller_kind]


def operator_policy(mask: np.ndarray, tanh_constant: float = 1.5, hidden: int = 64,
                    init_range: float = 0.1, controller_kind: str = 'enas',
                    prior: np.ndarray | None = None) -> Policy:
  """NAR's controller: one operator per node of ``mask (num_nodes, num_ops)``.

  ``controller_kind``: a key of :data:`nar_jax.controller.VARIANTS` (``'enas'``:
  ENAS's controller, exactly; ``'node_aware'``: told which node it decides).
  ``prior``: optional ``(num_nodes, num_ops)`` logit offsets added to every decision
  (:func:`nar_jax.controller.original_prior`: start the search near the base network);
  ``uniform`` then samples from ``softmax(prior)``, the untrained policy's start.

  Loss: :func:`nar_jax.reinforce.reinforce_loss`; diagnostics:
  :func:`nar_jax.reinforce.operator_update_diagnostics`.
  """
  mask = jnp.asarray(mask, bool)
  variant = _variant(controller_kind)
  prior = None if prior is None else jnp.asarray(prior, jnp.float32)
  return Policy(
      kind='operators', search='operators', num_args=0,
      init=lambda key: controller.init_variant(key, variant, *mask.shape, hidden, init_range),
      sample=lambda params, key: controller.sample(params, key, mask, tanh_constant, variant,
                                                   prior),
      most_likely=lambda params: controller.most_likely(params, mask, tanh_constant, variant,
                                                        prior),
      score=lambda params, arch: controller.log_prob(params, arch, mask, tanh_constant,
                                                     variant, prior),
      uniform=lambda key: controller.uniform_sample(key, mask, prior),
      loss=lambda scored, advantages: reinforce.reinforce_loss(scored.log_prob, advantages),
      diagnostics=lambda params, archs, rewards, advantages: (
          reinforce.operator_update_diagnostics(params, archs, rewards, advantages, mask,
                                                tanh_constant, variant, prior)),
  )


def joint_policy(space: JointSpace, tanh_constant: float = 1.5, hidden: int = 64,
                 init_range: float = 0.1, skip_target: float = controller.SKIP_TARGET,
                 skip_weight: float = controller.SKIP_WEIGHT, search: str = 'joint',
                 uniform_skip_prob: float = 0.5, controller_kind: str = 'enas') -> Policy:
  """ENAS's joint controller over ``space``, searching ``search``:

  * ``'joint'``: operators and skips; loss :func:`nar_jax.reinforce.joint_loss`
    (REINFORCE on the whole log-probability + ``skip_weight`` x KL skip penalty).
  * ``'operators'``: skips forced to the incumbent's (the extra argument, a flat
    joint architecture); loss REINFORCE on the operators' log-probability only.
  * ``'skips'``: operators forced to the incumbent's; loss REINFORCE on the skips'
    log-probability + ``skip_weight`` x skip penalty.

  The diagnostics (:func:`nar_jax.reinforce.joint_update_diagnostics`) report both
  gradient terms whatever ``search`` is. ``uniform`` draws ops uniformly and each skip
  bit with probability ``uniform_skip_prob``. ``controller_kind`` as in
  :func:`operator_policy` (the variant changes the op decisions only).
  """
  if search not in SEARCHES:
    raise ValueError(f'unknown search {search!r}; use one of {", ".join(SEARCHES)}')
  variant = _variant(controller_kind)
  mask = jnp.asarray(space.candidate_mask())
  num_layers = space.num_layers

  def forced(args):
    """``(fixed_ops, fixed_skips)`` keyword arguments from the incumbent in ``args``."""
    if search == 'joint':
      return {}
    ops_, skips = joint.split(jnp.asarray(args[0], jnp.int32), num_layers)
    return {'fixed_skips': skips} if search == 'operators' else {'fixed_ops': ops_}

  def loss(scored, advantages):
    if search == 'operators':
      return reinforce.reinforce_loss(scored.op_log_prob, advantages)
    log_prob = scored.log_prob if search == 'joint' else scored.skip_log_prob
    return reinforce.joint_loss(log_prob, advantages, scored.skip_penalty, skip_weight)

  return Policy(
      kind='joint', search=search, num_args=0 if search == 'joint' else 1,
      init=lambda key: controller.init_joint_variant(key, variant, *mask.shape, hidden,
                                                     init_range),
      sample=lambda params, key, *args: controller.sample_joint(
          params, key, mask, tanh_constant, skip_target, **forced(args), variant=variant),
      most_likely=lambda params, *args: controller.most_likely_joint(
          params, mask, tanh_constant, skip_target, **forced(args), variant=variant),
      score=lambda params, arch, *args: controller.log_prob_joint(
          params, arch, mask, tanh_constant, skip_target, variant),
      uniform=lambda key: controller.uniform_sample_joint(key, mask, uniform_skip_prob),
      loss=loss,
      diagnostics=lambda params, archs, rewards, advantages, *args: (
          reinforce.joint_update_diagnostics(params, archs, rewards, advantages, mask,
                                             tanh_constant, variant)),
  )
