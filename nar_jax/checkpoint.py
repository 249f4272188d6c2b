"""Per-phase Orbax checkpoints: a state pytree plus JSON metadata, one manager per phase.

Resuming is running the same command again: each phase asks its
:class:`PhaseCheckpoints` for the latest saved step and continues after it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from nar_jax.workdir import WorkdirError


class PhaseCheckpoints:
  """Checkpoints of one phase under ``<workdir>/checkpoints/<phase>``.

  Each checkpoint holds ``state`` (any pytree of arrays: weights, BN statistics,
  optimizer states, controller, baseline, RNG key, step) and ``meta`` (a JSON dict).
  """

  def __init__(self, workdir: str, phase: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints', phase))
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` and ``meta`` as ``step`` and waits until it is on disk.

    Orbax writes a step into a temporary directory and renames it when complete; older
    steps beyond ``max_to_keep`` are removed only after that. So a save that fails (no
    space left, permission denied) leaves the previous checkpoint as it was, and runs
    resume from it.

    Raises:
      WorkdirError: the save failed; names the directory, the error and the step kept.
    """
    kept = self.latest_step()
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      self._manager.wait_until_finished()
    except (OSError, ValueError) as error:  # tensorstore reports I/O errors as ValueError
      previous = ('there was no earlier checkpoint' if kept is None else
                  f'the previous checkpoint (step {kept}) is kept')
      raise WorkdirError(
          f'checkpoint step {step} could not be written to {self.directory}: {error}; '
          f'{previous}: free space or fix permissions and run the same command again to '
          f'resume') from error

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    """Restores ``(state, meta)`` of ``step``; ``like`` gives the pytree structure and shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def close(self) -> None:
    self._manager.close()
