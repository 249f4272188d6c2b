"""A background thread that reads (and decodes) the next batches while the device trains."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Runs `iterator` in a background thread, up to `size` items ahead.

  Use it around `data.batches` of a `LazyImages` split so the next batches
  are read and decoded while the device trains on the current one. Items come
  out in order; an exception raised by `iterator` is re-raised here. Closing
  the returned generator (or dropping it) stops the thread at its next item.
  """
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(f'prefetch size must be a positive int, got {size!r}.')
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  end = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in iterator:
        if not put((item, None)):
          return
      put((end, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((end, e))

  threading.Thread(target=produce, daemon=True, name='prefetch').start()

  def consume():
    try:
      while True:
        item, error = items.get()
        if error is not None:
          raise error
        if item is end:
          return
        yield item
    finally:
      stop.set()

  return consume()


# The proxy task -----------------------------------------------------------------
