"""The own-network example (``examples/own_network.py``): a family declared outside the
package runs the whole pipeline, and its counts and networks obey the same invariants
as the built-in families'."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import config as config_lib
from nar_jax import families, pipeline
from nar_jax.models import nodes
from test_pipeline import REPO

EXAMPLE = os.path.join(REPO, 'examples', 'own_network.py')


@pytest.fixture(scope='module')
def example():
  """The example module, imported as the command line imports a config file."""
  return families.import_family_module(EXAMPLE)


def _param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_counts_equal_the_initialised_parameters(example):
  sp = example.vgg_space(0.5)
  images = jnp.zeros((2, 28, 28, 1), jnp.float32)
  rng = np.random.default_rng(0)
  archs = [sp.baseline()] + [tuple(int(rng.choice(np.flatnonzero(m))) for m in sp.candidate_mask())
                             for _ in range(4)]
  assert len(set(archs)) > 2
  for arch in archs:
    net = example.TinyVGG(sp, 10, arch=arch)
    shapes = jax.eval_shape(lambda x, net=net: net.init(jax.random.key(0), x, train=False), images)
    assert example.count_architecture(sp, arch, (28, 28), 1, 10).params == _param_count(
        shapes['params'])
  # MACs of the baseline, by hand: stem 3x3x1x8 at 28x28, then the five 3x3 convs.
  macs = (28 * 28 * 9 * 1 * 8 + 28 * 28 * 9 * 8 * 8 + 14 * 14 * 9 * 8 * 16 + 14 * 14 * 9 * 16 * 16
          + 7 * 7 * 9 * 16 * 32 + 7 * 7 * 9 * 32 * 32 + 32 * 10)
  assert example.count_architecture(sp, sp.baseline(), (28, 28), 1, 10).macs == macs


def test_supernet_equals_the_fixed_network(example):
  sp = example.vgg_space(0.25)
  images = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
  supernet = example.TinyVGG(sp, 3)
  variables = supernet.init(jax.random.key(0), images, jnp.asarray(sp.baseline()), train=False)
  arch = tuple(int(np.flatnonzero(m)[-1]) for m in sp.candidate_mask())  # the last candidates
  assert arch != sp.baseline()
  fixed = example.TinyVGG(sp, 3, arch=arch)
  chex.assert_trees_all_close(
      supernet.apply(variables, images, jnp.asarray(arch), train=False),
      fixed.apply(nodes.select_branches(variables, arch), images, train=False), atol=1e-5)


def test_the_family_is_registered_under_its_base(example):
  config = example.get_config('smoke')
  assert families.family_for(config) is example.FAMILY
  config_lib.validate(config)
  with pytest.raises(ValueError, match="unknown variant 'x'"):
    example.get_config('x')


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory, compile_cache, example):
  workdir = str(tmp_path_factory.mktemp('own'))
  report = pipeline.run(example.get_config('smoke'), workdir)
  return workdir, report


def test_the_pipeline_refines_the_example_end_to_end(smoke_run, example):
  workdir, report = smoke_run
  sp = example.vgg_space(0.25)
  assert report['space'] == sp.name and report['nodes'] == [n.name for n in sp.nodes]
  for name in ('baseline', 'refined'):
    counts = example.count_architecture(sp, report[name]['arch'], (28, 28), 1, 10)
    assert (report[name]['params'], report[name]['macs']) == (counts.params, counts.macs)
    assert 0.0 <= report[name]['test_acc'] <= 1.0
  with open(os.path.join(workdir, 'report.md')) as f:
    assert '| conv5 |' in f.read()


def test_a_later_command_finds_the_family_from_config_json(smoke_run):
  """A fresh process that reads only the workdir (as ``nar_jax.evaluate`` does) imports
  ``model.family_module`` and gets the example's family and space back."""
  workdir, report = smoke_run
  code = ('import sys; from nar_jax import evaluate, families; '
          'c = evaluate.load_run_config(sys.argv[1]); '
          'print(families.family_for(c).name, families.build_space(c).name)')
  out = subprocess.run([sys.executable, '-c', code, workdir], cwd='/', capture_output=True,
                       text=True, check=True, env={**os.environ, 'PYTHONPATH': REPO})
  assert out.stdout.split() == ['tiny_vgg', report['space']]
  with open(os.path.join(workdir, pipeline.CONFIG_FILE)) as f:
    assert json.load(f)['model']['family_module'] == EXAMPLE
