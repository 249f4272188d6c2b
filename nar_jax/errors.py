"""The errors a run stops with (the command line prints them and exits with status 2)."""


class NonFiniteError(ValueError):
  """Training or scoring met a non-finite value (a diverged run).

  Raised before anything non-finite is saved: the phase's last checkpoint and every
  finished phase's result stay, so the same command with a saner setting (e.g. a lower
  learning rate) resumes from them.
  """
