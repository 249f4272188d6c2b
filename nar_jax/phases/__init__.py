"""The phases of a run, one module each, on one loop skeleton (:mod:`nar_jax.phases.loop`).

:mod:`~nar_jax.phases.context` (what every phase shares), :mod:`~nar_jax.phases.pretrain`,
:mod:`~nar_jax.phases.search` (ENAS's alternation of child epochs and controller updates,
or random search), :mod:`~nar_jax.phases.derive`, :mod:`~nar_jax.phases.alternating`
(operator / skip phases), :mod:`~nar_jax.phases.retrain`. :mod:`nar_jax.pipeline` runs them.
"""
