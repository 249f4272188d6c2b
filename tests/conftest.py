"""Shared pytest setup: the entry points' XLA flags, four fake CPU devices, a persistent
compilation cache fixture shared by the session and its pytest-xdist workers."""

import os

import chex
import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from nar_jax import train

train.add_cpu_xla_flags()  # As the command-line entry points do.
chex.set_n_cpu_devices(4)


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
  """JAX's persistent compilation cache in a temporary directory, shared by every test
  that asks for it (from its first request to the end of the session).

  XLA:CPU needs tens of seconds to compile a supernet step; with the cache, later runs of
  the same pipeline (interrupted, resumed, re-run, or the same tiny config in another
  module) load the first run's executables instead of compiling them again.
  """
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = {name: getattr(jax.config, name) for name in names}
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):  # <basetemp>/popen-gw<i>: share the parent
    root = root.parent
  directory = root / 'jax_cache'
  directory.mkdir(exist_ok=True)
  # An entry read while another worker is still writing it does not decompress: JAX
  # warns and compiles the program itself.
  jax.config.update('jax_compilation_cache_dir', str(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
