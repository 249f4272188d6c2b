"""Benchmark cases and the lock that times concurrent benchmark processes one at a time."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess

import jax
import pytest

from nar_jax import bench


def test_resnet_case_is_the_cifar_resnet18_supernet():
  case = bench.parse_case('r18_w16')
  assert case.family.name == 'resnet' and case.scannable
  assert case.space.name.startswith('resnet18') and case.space.stem_channels == 16
  assert (case.num_classes, case.image) == (10, 32)
  assert bench.parse_case('r18').space.stem_channels == 64


def test_face_case_is_the_ir50_supernet_with_face_conventions():
  case = bench.parse_case('ir50')
  assert case.family.name == 'ir' and not case.scannable and case.head.kind == 'face'
  assert case.space.num_nodes == 48 and case.space.stem_channels == 64
  assert (case.num_classes, case.image) == (4000, 112)
  assert case.stats['mean'] == (127.5 / 255,) * 3 and case.stats['std'] == (128 / 255,) * 3
  assert case.stats['crop_padding'] == 0
  narrow = bench.parse_case('ir50_w16')
  assert narrow.space.stem_channels == 16 and narrow.space.num_nodes == 48
  assert bench.parse_case('ir18_w8').space.num_nodes == 16


def test_case_choice_defaults_to_the_platform_and_can_be_named():
  assert bench.parse_case('r18_w16', 'cpu').choice == 'switch'
  assert bench.parse_case('r18_w16', 'gpu').choice == 'select'
  assert bench.parse_case('r18_w16@select', 'cpu').choice == 'select'
  assert bench.parse_case('ir50_w16@switch', 'gpu').choice == 'switch'


def test_gpu_check_cases_parse():
  """launch/gpu_check.sh's dry run: r18_w64 (b64 fp32, b256 bf16) and ir50 (b256 bf16),
  each @switch, @select and @switch with the command-buffer flags."""
  root = os.path.join(os.path.dirname(__file__), '..')
  listing = subprocess.run(['bash', 'launch/gpu_check.sh', '/tmp/unused'], cwd=root,
                           env=dict(os.environ, DRY_RUN='1'), capture_output=True, text=True,
                           check=True).stdout.splitlines()
  cases = [re.search(r'--cases=(\S+)', line).group(1) for line in listing]
  assert len(cases) == 9
  assert {bench.parse_case(c, 'gpu').choice for c in cases} == {'switch', 'select'}
  assert sum('xla_gpu_enable_command_buffer=+CONDITIONAL' in line for line in listing) == 3


@pytest.mark.parametrize('name', ['r50_w16', 'r18_w0', 'r18_wx', 'ir50_', 'ir7', '',
                                  'r18_w16@cond'])
def test_bad_case_names_raise(name):
  with pytest.raises(ValueError):
    bench.parse_case(name)


def test_default_cases_add_the_face_supernet_on_accelerators_only():
  assert bench.default_cases('cpu') == ('r18_w16', 'r18_w64')
  assert bench.default_cases('gpu') == ('r18_w16', 'r18_w64', 'ir50')
  for name in bench.default_cases('tpu'):
    bench.parse_case(name)


def test_default_loop_scans_in_memory_data_on_accelerators_only():
  resnet, face = bench.parse_case('r18_w16'), bench.parse_case('ir50')
  assert bench.default_loop(resnet, 'gpu') == 'scan'
  assert bench.default_loop(resnet, 'cpu') == 'step'
  assert bench.default_loop(face, 'gpu') == bench.default_loop(face, 'cpu') == 'step'


def test_exclusive_holds_the_lock_until_the_block_ends(tmp_path):
  path = str(tmp_path / 'bench.lock')

  def try_lock():
    with open(path, 'a') as f:  # a second open file description: flock conflicts
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        return False
      fcntl.flock(f, fcntl.LOCK_UN)
      return True

  with bench.exclusive(path):
    assert not try_lock()
  assert try_lock()
  with bench.exclusive(None):
    assert try_lock()


def test_run_case_measures_every_field_on_a_tiny_supernet():
  result = bench.run_case('r18_w4@select', batch=8, steps=2, num_archs=1, dtype='float32',
                          image=16, loop='step')
  timings = ('supernet_step_s', 'paired_supernet_step_s', 'fixed_step_s', 'compile_s',
             'compile_cpu_s', 'controller_update_s', 'search_loop_overhead', 'images_per_s',
             'ratio', 'ratio_cpu', 'peak_rss_mb', 'archs_per_s')
  for name in timings:
    assert result[name] > 0, name
  # One paired architecture: the ratio is its supernet step over its fixed step.
  assert result['ratio'] == pytest.approx(result['paired_supernet_step_s'] /
                                          result['fixed_step_s'])
  assert result['images_per_s'] == pytest.approx(8 / result['supernet_step_s'])
  assert result['archs_per_step'] == 1
  assert result['archs_per_s'] == pytest.approx(1 / result['supernet_step_s'])
  assert (result['case'], result['choice'], result['width'], result['image'],
          result['loop']) == ('r18_w4@select', 'select', 4, 16, 'step')
  assert result['devices'] == jax.device_count()


@pytest.mark.parametrize('steps,archs', [(0, 1), (1, 0)])
def test_run_case_needs_a_timed_step_and_an_architecture(steps, archs):
  with pytest.raises(ValueError, match='positive'):
    bench.run_case('r18_w4', batch=8, steps=steps, num_archs=archs, dtype='float32')


def test_run_case_rejects_archs_per_step_that_do_not_divide_the_devices():
  with pytest.raises(ValueError, match='divisor of the device count'):
    bench.run_case('r18_w4', batch=8, steps=1, num_archs=1, dtype='float32', archs_per_step=3)
