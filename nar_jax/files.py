"""Atomic writes: a file a run writes is either complete or absent."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path`` atomically."""
  write_text(path, json.dumps(obj, indent=2))


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
