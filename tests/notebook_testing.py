"""Executing the repository's notebooks headless (nbclient), with parameters injected.

A notebook's cell tagged ``parameters`` sets its defaults; :func:`execute` inserts a cell
right after it that assigns the given values (as papermill does), runs every cell in a
fresh kernel of this Python (the one running the tests) in the repository root, and
returns the executed notebook. Also usable to refresh the committed outputs:

  python tests/notebook_testing.py notebooks/quickstart.ipynb [NAME=PYTHON_VALUE ...]
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from typing import Any

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = 'nar_jax_notebook_test'


def inject_parameters(nb: nbformat.NotebookNode, parameters: dict[str, Any]) -> None:
  """Inserts ``NAME = repr(value)`` lines after the cell tagged ``parameters`` (in place).

  Raises:
    ValueError: the notebook has no such cell, or a name it does not define there.
  """
  index = next((i for i, c in enumerate(nb.cells)
                if 'parameters' in c.get('metadata', {}).get('tags', [])), None)
  if index is None:
    raise ValueError('the notebook has no cell tagged "parameters"')
  defined = set(re.findall(r'^(\w+)\s*=', nb.cells[index].source, re.M))
  unknown = set(parameters) - defined
  if unknown:
    raise ValueError(f'not parameters of the notebook: {sorted(unknown)} (it has {sorted(defined)})')
  cell = nbformat.v4.new_code_cell('\n'.join(f'{k} = {v!r}' for k, v in parameters.items()))
  cell.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(index + 1, cell)


def _kernel_env() -> dict[str, str]:
  """This process's environment, without the tests' fake device count (the notebooks run
  on the machine's real devices, as a user's would)."""
  env = dict(os.environ)
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = ' '.join(flags.split())
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  return env


def execute(path: str, parameters: dict[str, Any] | None = None, *, timeout: int = 900,
            cwd: str = REPO) -> nbformat.NotebookNode:
  """Runs the notebook at `path` with `parameters` injected; returns it with its outputs.

  Raises:
    nbclient.exceptions.CellExecutionError: a cell failed (the message shows its traceback).
  """
  nb = nbformat.read(path, as_version=4)
  if parameters:
    inject_parameters(nb, parameters)
  with tempfile.TemporaryDirectory() as spec_root:
    spec_dir = os.path.join(spec_root, 'kernels', KERNEL)
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, 'kernel.json'), 'w') as f:
      json.dump({'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
                 'display_name': 'nar_jax tests', 'language': 'python'}, f)
    saved = os.environ.get('JUPYTER_PATH')
    os.environ['JUPYTER_PATH'] = os.pathsep.join(p for p in (spec_root, saved) if p)
    try:
      client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                              resources={'metadata': {'path': cwd}})
      client.execute(env=_kernel_env())
    finally:
      if saved is None:
        os.environ.pop('JUPYTER_PATH', None)
      else:
        os.environ['JUPYTER_PATH'] = saved
  nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
  return nb


if __name__ == '__main__':
  import ast  # pylint: disable=g-import-not-at-top
  target, *assignments = sys.argv[1:]
  values = {}
  for a in assignments:
    name, _, value = a.partition('=')
    values[name] = ast.literal_eval(value)
  executed = execute(target, values)
  for cell in executed.cells:  # Keep the committed notebook's parameters as they were.
    if 'injected-parameters' in cell.metadata.get('tags', []):
      executed.cells.remove(cell)
      break
  nbformat.write(executed, target)
  print('executed', target)
