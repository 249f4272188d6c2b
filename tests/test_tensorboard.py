"""TensorBoard event files from metrics records, read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from nar_jax import tensorboard

event_accumulator = pytest.importorskip(
    'tensorboard.backend.event_processing.event_accumulator')


def load_events(logdir):
  """TensorBoard's EventAccumulator over every event file in `logdir`, all events kept."""
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={
      event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
      event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def scalars(acc, tag):
  return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def text_of(acc, tag):
  return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f'{tag}/text_summary')]


OP_PROBS = [[0.5, 0.5, 0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0, 0.0]]
RECORDS = [
    {'phase': 'search', 'epoch': 1, 'train_loss': 2.5, 'train_acc': 0.1, 'step_s': 0.2},
    {'phase': 'controller', 'epoch': 1, 'update': 1, 'reward': 0.25, 'baseline': 0.2,
     'entropy': 8.0, 'grad_norm': 0.5, 'op_probs': OP_PROBS, 'op_entropy': [0.6, 1.2]},
    {'phase': 'controller', 'epoch': 1, 'update': 2, 'reward': 0.3, 'baseline': 0.21,
     'entropy': 7.9, 'grad_norm': 0.4, 'op_probs': OP_PROBS},
    {'phase': 'search', 'epoch': 2, 'train_loss': 2.0, 'train_acc': 0.3, 'step_s': 0.2},
    {'phase': 'controller', 'epoch': 2, 'update': 1, 'reward': 0.35, 'baseline': 0.22,
     'entropy': 7.8, 'grad_norm': 0.3, 'op_probs': OP_PROBS},
    {'phase': 'retrain_refined', 'epoch': 1, 'train_loss': 1.0, 'train_acc': 0.6},
    {'phase': 'retrain_refined', 'epoch': 2, 'train_loss': 0.5, 'train_acc': 0.8},
    {'phase': 'retrain_refined', 'test_acc': 0.75, 'test_loss': 0.9},
    {'phase': 'retrain_refined', 'epoch': 2, 'verification': 'lfw', 'accuracy': 0.9,
     'accuracy_std': 0.01, 'tar': 0.5, 'far': 0.001},
    {'phase': 'alternating', 'step': 1, 'search': 'ops', 'round': 1, 'er': 0.4,
     'improved': True, 'arch': [0, 1]},
]


def test_records_become_scalars_images_and_text_with_their_steps(tmp_path):
  writer = tensorboard.Writer(str(tmp_path))
  for record in RECORDS:
    writer.record(record)
  writer.text('report', '| a | b |\n| --- | --- |\n| 1 | 2 |')
  writer.close()
  writer.close()  # Idempotent.
  acc = load_events(str(tmp_path))
  tags = acc.Tags()
  assert {'search/train_loss', 'search/train_acc', 'controller/reward', 'controller/baseline',
          'controller/entropy', 'controller/grad_norm', 'retrain_refined/test_acc',
          'retrain_refined/lfw/accuracy', 'alternating/ops/er',
          'alternating/ops/improved'} <= set(tags['scalars'])
  # Positions and lists are not scalars.
  assert not any(t.endswith(('/epoch', '/update', '/step', '/round', '/arch', '/op_entropy'))
                 for t in tags['scalars'])
  assert scalars(acc, 'search/train_loss') == [(1, 2.5), (2, 2.0)]
  # Controller steps count updates over epochs; test results sit at the last epoch.
  assert scalars(acc, 'controller/reward') == [(1, 0.25), (2, 0.3), (3, 0.35)]
  assert scalars(acc, 'retrain_refined/test_acc') == [(2, 0.75)]
  assert scalars(acc, 'alternating/ops/improved') == [(1, 1.0)]
  assert tags['images'] == ['controller/op_probs']
  images = acc.Images('controller/op_probs')
  assert [e.step for e in images] == [1, 2, 3]
  assert (images[0].height, images[0].width) == (2 * tensorboard.CELL_PIXELS,
                                                 6 * tensorboard.CELL_PIXELS)
  pixels = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)))
  np.testing.assert_array_equal(pixels, tensorboard.heatmap(OP_PROBS))
  assert text_of(acc, 'report') == ['| a | b |\n| --- | --- |\n| 1 | 2 |']
  with pytest.raises(ValueError, match='closed'):
    writer.record(RECORDS[0])


def test_a_resumed_run_counts_on_from_the_earlier_records(tmp_path):
  first = tensorboard.Writer(str(tmp_path))
  for record in RECORDS[:3]:
    first.record(record)
  first.close()
  resumed = tensorboard.Writer(str(tmp_path), history=RECORDS[:3])
  resumed.record(RECORDS[2])  # Epoch 1's update 2 again (an interrupted epoch re-run).
  resumed.record(RECORDS[4])
  resumed.close()
  assert len(os.listdir(tmp_path)) == 2  # One event file per run.
  assert scalars(load_events(str(tmp_path)), 'controller/reward') == [
      (1, 0.25), (2, 0.3), (2, 0.3), (3, 0.35)]


def test_heatmap_is_viridis_cells_row_zero_on_top():
  image = tensorboard.heatmap([[0.0, 1.0], [2.0, -1.0]], cell=3)
  assert image.shape == (6, 6, 3) and image.dtype == np.uint8
  dark, bright = image[0, 0], image[0, 3]  # viridis: 0 dark blue-violet, 1 bright yellow
  assert dark.sum() < bright.sum() and bright[0] > 200 and bright[2] < 80
  np.testing.assert_array_equal(image[3, 0], bright)  # 2.0 is clipped to 1
  np.testing.assert_array_equal(image[3, 3], dark)  # -1.0 is clipped to 0
  with pytest.raises(ValueError, match='2-D'):
    tensorboard.heatmap([0.5, 0.5])


def test_read_records_skips_a_cut_off_last_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  assert tensorboard.read_records(str(path)) == []
  path.write_text('{"phase": "search", "epoch": 1}\n{"phase": "contr')
  assert tensorboard.read_records(str(path)) == [{'phase': 'search', 'epoch': 1}]
