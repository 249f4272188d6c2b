"""Every config file and each of its variants loads and validates; unknown variants fail."""

from __future__ import annotations

import glob
import json
import os

import pytest

from nar_jax import config as config_lib
from nar_jax import transfer

from config_testing import CONFIGS, load_config

VARIANTS = {
    'cifar_alternating': ['smoke'],
    'cifar_nasarch': ['smoke'],
    'cifar_resnet18': ['pretrain'],
    'cifar_resnet18_block': ['pretrain'],
    'cifar_resnet20_wide': [],
    'face_lresnet50e_ir': ['proxy', 'pretrain', 'smoke'],
    'imagenet_resnet18': ['baseline', 'smoke'],
    'quickstart': ['random'],
    'transfer_study': ['smoke'],
}
# Read by nar_jax.transfer, which builds nar_jax.main configs per network and task.
NOT_MAIN = ('transfer_study',)


def test_every_config_file_is_listed():
  files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, '*.py'))}
  assert files == set(VARIANTS)


@pytest.mark.parametrize('name,variant', [(name, variant) for name, variants in VARIANTS.items()
                                          for variant in [None, *variants]])
def test_config_loads_and_validates(name, variant, tmp_path):
  config = load_config(name, variant)
  if name in NOT_MAIN:
    _validate_transfer_study(config, tmp_path)
    return
  if config.dataset.name == 'faces' and not config.dataset.data_dir:
    config.dataset.data_dir = str(tmp_path)  # The command line must name it (tested below).
  if config.dataset.name == 'imagenet2012' and not config.arch:
    config.arch = 'baseline'  # The command line names an arch.json (test_imagenet.py).
  config_lib.validate(config)


def _validate_transfer_study(study, tmp_path):
  """Every (network, task) pipeline config the study would run validates. Without a NAS-Arch
  (the full study's default) the error says to name one; an ``arch.json`` as a
  ``cifar_nasarch`` run writes it (12 layers) is then read from its path."""
  if not study.nas_arch:
    with pytest.raises(ValueError, match='config.nas_arch must name the arch.json'):
      transfer.run_config(study, 'nas_arch', 'A', str(tmp_path))
    arch = [{'op': 'conv3x3', 'skips': ['stem'] if i % 2 else []} for i in range(12)]
    (tmp_path / 'arch.json').write_text(json.dumps({'arch': arch}))
    study.nas_arch = str(tmp_path / 'arch.json')
  names = transfer.networks(study)
  assert set(names) == set(transfer.NETWORKS)
  for network in names:
    for task in transfer.TASKS:
      config = transfer.run_config(study, network, task, str(tmp_path / f'data_{task}'))
      config_lib.validate(config)  # run_config validates too; this is the contract.
      assert config.dataset.name == study.tasks[task].name


def test_face_config_requires_the_data_directory():
  with pytest.raises(ValueError, match='data_dir'):
    config_lib.validate(load_config('face_lresnet50e_ir', None))


def test_gpu_cifar_configs_scan_each_epoch_and_cpu_configs_do_not():
  assert load_config('cifar_resnet18', None).scan_epoch
  assert load_config('cifar_resnet18_block', 'pretrain').scan_epoch
  assert not load_config('quickstart', None).scan_epoch


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_unknown_variant_is_rejected(name):
  with pytest.raises(ValueError, match='no_such_variant'):
    load_config(name, 'no_such_variant')


# ---------------------------------------------------------------------------
# Finding config files: a path, or the copy that came with the package.


def test_resolve_config_file_keeps_an_existing_path_and_its_variant(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'quickstart.py').write_text('# a local copy\n')
  assert config_lib.resolve_config_file('configs/quickstart.py:x') == 'configs/quickstart.py:x'


def test_resolve_config_file_falls_back_to_the_packaged_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # No configs/ here.
  packaged = config_lib.packaged_configs_dir()
  assert packaged is not None and os.path.samefile(packaged, CONFIGS)
  want = os.path.join(packaged, 'face_lresnet50e_ir.py')
  assert config_lib.resolve_config_file('configs/face_lresnet50e_ir.py:smoke') == want + ':smoke'
  assert config_lib.resolve_config_file('quickstart.py') == os.path.join(packaged, 'quickstart.py')
  # Not a packaged config: unchanged, for the loader to report.
  assert config_lib.resolve_config_file('other/quickstart.py') == 'other/quickstart.py'
  assert config_lib.resolve_config_file('configs/nothing.py') == 'configs/nothing.py'


def test_resolve_config_file_expands_home(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'mine.py').write_text('')
  assert config_lib.resolve_config_file('~/mine.py:v') == str(tmp_path / 'mine.py') + ':v'


def test_resolve_config_argv_rewrites_only_the_config_flag(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  packaged = config_lib.packaged_configs_dir()
  argv = ['prog', '--config=configs/quickstart.py', '--config.search.epochs=1', '--workdir=w']
  assert config_lib.resolve_config_argv(argv) == [
      'prog', f'--config={packaged}/quickstart.py', '--config.search.epochs=1', '--workdir=w']
  assert config_lib.resolve_config_argv(['prog', '--config', 'configs/quickstart.py']) == [
      'prog', '--config', f'{packaged}/quickstart.py']


def test_load_config_file_is_the_command_lines_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert (config_lib.load_config_file('configs/face_lresnet50e_ir.py:smoke').to_dict()
          == load_config('face_lresnet50e_ir', 'smoke').to_dict())
  with pytest.raises(ValueError, match="config file 'configs/nothing.py' not found"):
    config_lib.load_config_file('configs/nothing.py')


def test_expand_path_expands_home_and_makes_relative_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.chdir(tmp_path)
  assert config_lib.expand_path('~/data') == str(tmp_path / 'data')
  assert config_lib.expand_path('runs/x') == str(tmp_path / 'runs' / 'x')
  assert config_lib.expand_path('') == ''  # "Not given" stays so.


def test_face_data_dir_may_start_with_home(tmp_path, monkeypatch):
  from nar_jax.tasks import faces as face_task  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('HOME', str(tmp_path))
  config = load_config('face_lresnet50e_ir', None)
  config.dataset.data_dir = '~/faces_emore'
  assert face_task.face_directory(config, str(tmp_path / 'w')) == str(tmp_path / 'faces_emore')
  smoke = load_config('face_lresnet50e_ir', 'smoke')
  smoke.dataset.data_dir = '~/synthetic'
  smoke.dataset.synthetic.num_identities = 4
  smoke.dataset.synthetic.verification_identities = 2
  smoke.dataset.synthetic.num_pairs = 4
  assert face_task.face_directory(smoke, str(tmp_path / 'w')) == str(tmp_path / 'synthetic')
  assert (tmp_path / 'synthetic' / 'train.rec').exists()
