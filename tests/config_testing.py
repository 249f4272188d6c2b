"""Loading the repository's config files in tests, as the command line loads them."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')


def load_config(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """``configs/<name>.py:<variant>``: the file's ``get_config(variant)``."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)
