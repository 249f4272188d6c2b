"""Images per second of the ImageNet train input pipeline (nar_jax.data.imagenet.batches).

  PYTHONPATH=. python benchmarks/imagenet_input.py                      # fake, 375-500 px JPEGs
  PYTHONPATH=. python benchmarks/imagenet_input.py --data_dir=~/tensorflow_datasets \
      --threads=16 --processes=8 --images=20000                         # a prepared imagenet2012

Without ``--data_dir`` it writes a fake imagenet2012 (``--images`` train JPEGs of 375 to
500 pixels a side, about ImageNet's typical 500x375) in the real TFDS format to a
temporary directory. It then runs one train epoch (random-resized crop + flip, 224x224,
batches of ``--batch``) over the first ``--images`` records for each setting of
``--threads`` (in-process decoding threads) and ``--processes`` (grain worker
processes), and prints one line each: wall-clock images per second of the epoch after
its first batch (the start-up of threads and workers is reported apart).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import grain

from nar_jax.data import fake_imagenet, imagenet


def measure(source, batch: int, options: imagenet.InputOptions) -> tuple[float, float, int]:
  """(seconds to the first batch, images per second after it, images) of one epoch."""
  start = time.perf_counter()
  iterator = imagenet.batches(source, batch, train=True, seed=0, epoch=0,
                              shard=grain.sharding.ShardOptions(0, 1, drop_remainder=True),
                              options=options)
  images, _ = next(iterator)
  first = time.perf_counter()
  count = 0
  for images, _ in iterator:
    count += len(images)
  end = time.perf_counter()
  return first - start, count / max(end - first, 1e-9), count + batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=None,
                      help='a TFDS data directory holding imagenet2012 (default: write a fake one)')
  parser.add_argument('--images', type=int, default=512, help='train records read')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--threads', default='1,2,4', help='comma-separated thread counts')
  parser.add_argument('--processes', default='0', help='comma-separated worker-process counts')
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir
    if data_dir is None:
      data_dir = os.path.join(tmp, 'tfds')
      t = time.perf_counter()
      fake_imagenet.write_fake_imagenet(data_dir, {'train': args.images}, num_classes=10,
                                        sides=(375, 500))
      print(f'wrote a fake imagenet2012 of {args.images} JPEGs in '
            f'{time.perf_counter() - t:.1f} s', flush=True)
    source = imagenet.open_split(f'train[:{args.images}]', data_dir)
    kib = sum(len(source[i]['image']) for i in range(min(len(source), 256)))
    kib /= 1024 * min(len(source), 256)
    print(f'{len(source)} records, mean JPEG {kib:.0f} KiB, {os.cpu_count()} CPUs', flush=True)
    for processes in (int(p) for p in args.processes.split(',')):
      for threads in (int(t) for t in args.threads.split(',')):
        options = imagenet.InputOptions(threads=threads, processes=processes)
        startup, rate, count = measure(source, args.batch, options)
        print(f'threads {threads} processes {processes}: {rate:.0f} images/s '
              f'({count} images, first batch after {startup:.2f} s)', flush=True)


if __name__ == '__main__':
  main()
