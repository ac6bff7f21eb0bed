"""TensorBoard event files written synchronously, so a failing write stops the run instead of hanging it.

`tensorboardX.SummaryWriter` writes from a background thread through a bounded queue: when the disk fills up
that thread dies, the queue fills, and the interpreter waits on it forever at exit. This writer appends the
same event records from the calling thread (tensorboardX's `EventsWriter` and summary protos), flushes at
every `flush()`, and turns any `OSError` into a `SummaryWriteError` naming the event file and the cause.
"""
import os
import time

import numpy as np
from tensorboardX import event_file_writer
from tensorboardX import summary
from tensorboardX.proto import event_pb2


class SummaryWriteError(OSError):
  """Writing TensorBoard events failed (disk full, permissions); the message names the file."""


class SummaryWriter:
  """`add_scalar` / `add_image` / `flush` / `close` into `<logdir>/events.out.tfevents.*`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self._path = os.path.join(logdir, 'events')
    try:
      self._writer = event_file_writer.EventsWriter(self._path)
    except OSError as e:
      raise SummaryWriteError(f'Cannot create TensorBoard events in {logdir}: {e.strerror or e}.') from e
    self._path = self._writer._file_name  # pylint: disable=protected-access

  @property
  def path(self) -> str:
    return self._path

  def _write(self, value_summary, step: int) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=value_summary)
    try:
      self._writer.write_event(event)
    except OSError as e:
      raise SummaryWriteError(f'Writing TensorBoard events to {self._path} failed: {e.strerror or e}.') from e

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._write(summary.scalar(tag, float(value)), step)

  def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
    """`image`: uint8 `[H, W, 3]`."""
    self._write(summary.image(tag, np.asarray(image), dataformats='HWC'), step)

  def flush(self) -> None:
    try:
      self._writer.flush()
    except OSError as e:
      raise SummaryWriteError(f'Writing TensorBoard events to {self._path} failed: {e.strerror or e}.') from e

  def close(self) -> None:
    try:
      self._writer.close()
    except OSError as e:
      raise SummaryWriteError(f'Writing TensorBoard events to {self._path} failed: {e.strerror or e}.') from e
