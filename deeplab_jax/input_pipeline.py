"""Input pipeline: TFDS data source -> augmented, batched, per-host numpy batches.

Pure numpy/PIL on top of `builder.as_data_source(split)` (random access to array_record files, no
TensorFlow). Training follows the official DeepLab augmentation (`input_preprocess.py`): random scale in
[min_scale, max_scale] on a `scale_step` grid (bilinear image, nearest label), pad bottom/right to the crop
with the mean pixel and the ignore label, random crop, random left-right flip. Images stay raw RGB in
[0, 255] (the model normalises them). Evaluation pads each image top-left to the eval crop the same way
and marks padding examples of the last batch invalid.

Order and augmentation are functions of (seed, global sample number) only: the epoch-e order is a
permutation drawn from (seed, e), sample g = step * batch_size + i is augmented with a generator seeded by
(seed, g). So a run resumed at `start_step` sees exactly the batches of an uninterrupted run, and host p of
P reads only rows [p * B / P, (p + 1) * B / P) of each global batch.
"""
import collections
import concurrent.futures
import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from deeplab_jax import datasets
from deeplab_jax.models import mean_pixel

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer and evaluator need to know about the configured dataset."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  ignore_label: int
  num_train_examples: int
  num_eval_examples: int


# ----------------------------------------------------------------------------------------------------
# Augmentation ops: pure functions of numpy arrays (and a numpy Generator for the random ones).
# ----------------------------------------------------------------------------------------------------


def random_scale_factor(rng: np.random.Generator, min_scale: float, max_scale: float, step: float) -> float:
  """Official `get_random_scale`: uniform in [min, max] if step == 0, else uniform on the step grid."""
  if min_scale > max_scale or min_scale <= 0:
    raise ValueError(f'Need 0 < min_scale <= max_scale; got {min_scale}, {max_scale}.')
  if min_scale == max_scale:
    return float(min_scale)
  if step == 0:
    return float(rng.uniform(min_scale, max_scale))
  num_steps = int((max_scale - min_scale) / step + 1)
  return float(np.linspace(min_scale, max_scale, num_steps)[rng.integers(num_steps)])


def scale_image_and_label(image: np.ndarray, label: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Resizes by `scale` to (int(H * scale), int(W * scale)): bilinear image, nearest-neighbour label.

  Args:
    image: uint8 `[H, W, 3]`.
    label: uint8 `[H, W]` class indices.
    scale: the factor.

  Returns:
    uint8 `[H', W', 3]` image and uint8 `[H', W']` label.
  """
  if scale == 1.0:
    return image, label
  height, width = label.shape
  size = (max(1, int(width * scale)), max(1, int(height * scale)))  # PIL sizes are (width, height).
  image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
  label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
  return image, label


def pad_to_size(image: np.ndarray, label: np.ndarray, height: int, width: int,
                pad_value: Sequence[float], ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads bottom/right up to at least (height, width): image with `pad_value`, label with `ignore_label`.

  Args:
    image: `[H, W, 3]` pixels.
    label: `[H, W]` class indices.
    height: minimum output height.
    width: minimum output width.
    pad_value: RGB fill for the image (the mean pixel, which the model maps to zero).
    ignore_label: fill for the label.

  Returns:
    float32 `[max(H, height), max(W, width), 3]` image, int32 label of the same height and width.
  """
  h, w = label.shape
  out_h, out_w = max(h, height), max(w, width)
  padded_image = np.empty((out_h, out_w, 3), np.float32)
  padded_image[...] = np.asarray(pad_value, np.float32)
  padded_image[:h, :w] = image
  padded_label = np.full((out_h, out_w), ignore_label, np.int32)
  padded_label[:h, :w] = label
  return padded_image, padded_label


def random_crop(image: np.ndarray, label: np.ndarray, height: int, width: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The same random (height, width) window of image `[H, W, C]` and label `[H, W]` (H >= height, W >= width)."""
  h, w = label.shape
  if h < height or w < width:
    raise ValueError(f'random_crop: {h}x{w} input is smaller than the {height}x{width} crop; pad first.')
  top = int(rng.integers(h - height + 1))
  left = int(rng.integers(w - width + 1))
  return image[top:top + height, left:left + width], label[top:top + height, left:left + width]


def random_flip_left_right(image: np.ndarray, label: np.ndarray,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors image `[H, W, C]` and label `[H, W]` together with probability 1/2."""
  if rng.random() < 0.5:
    return image[:, ::-1], label[:, ::-1]
  return image, label


def augment_for_training(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                         crop_size: Sequence[int], min_scale: float, max_scale: float, scale_step: float,
                         pad_value: Sequence[float], ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
  """Official training augmentation: random scale, pad to the crop, random crop, random flip.

  Args:
    image: uint8 `[H, W, 3]`.
    label: uint8 `[H, W]`.
    rng: the example's random generator.
    crop_size: (crop height, crop width).
    min_scale, max_scale, scale_step: the random scale grid.
    pad_value: RGB fill (mean pixel).
    ignore_label: label fill.

  Returns:
    float32 `[Hc, Wc, 3]` raw pixels and int32 `[Hc, Wc]` labels.
  """
  crop_h, crop_w = crop_size
  scale = random_scale_factor(rng, min_scale, max_scale, scale_step)
  image, label = scale_image_and_label(image, label, scale)
  image, label = pad_to_size(image, label, crop_h, crop_w, pad_value, ignore_label)
  image, label = random_crop(image, label, crop_h, crop_w, rng)
  image, label = random_flip_left_right(image, label, rng)
  return np.ascontiguousarray(image), np.ascontiguousarray(label)


def pad_for_eval(image: np.ndarray, label: np.ndarray, crop_size: Sequence[int], pad_value: Sequence[float],
                 ignore_label: int, image_id: str = '') -> tuple[np.ndarray, np.ndarray]:
  """Pads image/label top-left-aligned to exactly `crop_size`; padding is never scored (ignore label).

  Raises:
    ValueError: the image is larger than the eval crop (it would have to be cut, losing pixels).
  """
  crop_h, crop_w = crop_size
  h, w = label.shape
  if h > crop_h or w > crop_w:
    raise ValueError(f'Eval image {image_id or "?"} is {h}x{w}, larger than config.eval.crop_size={crop_h}x{crop_w}; '
                     f'raise config.eval.crop_size to at least {max(h, crop_h)}x{max(w, crop_w)} '
                     '(official crops are 16k+1, e.g. 513 for VOC, 1025x2049 for Cityscapes).')
  return pad_to_size(image, label, crop_h, crop_w, pad_value, ignore_label)


# ----------------------------------------------------------------------------------------------------
# Data sources.
# ----------------------------------------------------------------------------------------------------


class Dataset:
  """The configured dataset, prepared once per run and passed to the trainer, evaluator and iterators.

  `load_dataset(config)` builds it: the TFDS builder is created and `download_and_prepare()`d once, the
  config is checked against what the data holds, and each split's data source is opened once.
  """

  def __init__(self, config: ml_collections.ConfigDict, builder):
    self._builder = builder
    self._sources = {}
    d = config.dataset
    names = tuple(builder.class_names)
    ignore_label = int(builder.info.metadata['ignore_label'])
    if d.num_classes != len(names):
      raise ValueError(f'config.dataset.num_classes={d.num_classes} but {d.name} has {len(names)} classes.')
    if d.ignore_label != ignore_label:
      raise ValueError(f'config.dataset.ignore_label={d.ignore_label} but {d.name} stores {ignore_label} for '
                       'ignored pixels.')
    if d.class_names:
      if len(d.class_names) != len(names):
        raise ValueError(f'config.dataset.class_names has {len(d.class_names)} names; the dataset has '
                         f'{len(names)} classes.')
      names = tuple(d.class_names)
    self.train_split, self.eval_split = d.train_split, d.eval_split
    limit = config.eval.num_images
    num_eval = len(self.source(d.eval_split))
    self.info = DatasetInfo(
        name=d.name, num_classes=len(names), class_names=names, ignore_label=ignore_label,
        num_train_examples=len(self.source(d.train_split)),
        num_eval_examples=num_eval if limit is None or limit < 0 else min(limit, num_eval))

  def source(self, split: str):
    """Random-access data source of `split` (opened once)."""
    if split not in self._sources:
      if split not in self._builder.info.splits:
        raise ValueError(f'Split {split!r} (config.dataset.train_split / eval_split) is not in dataset '
                         f'{self._builder.info.full_name}; available: {sorted(self._builder.info.splits)}.')
      self._sources[split] = self._builder.as_data_source(split=split)
    return self._sources[split]


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Prepares the configured dataset if needed (once per run) and checks config.dataset against it.

  Raises:
    ValueError: num_classes, ignore_label, class_names or a split in config.dataset disagree with the data.
    datasets.ManualDownloadError: the manual downloads are missing; the message names each file.
  """
  builder = datasets.get_builder(config.dataset)
  builder.download_and_prepare()
  return Dataset(config, builder)


def _decode(example: dict) -> tuple[np.ndarray, np.ndarray, str]:
  image_id = example['image_id']
  image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
  return example['image'], example['label'][..., 0], image_id


def shard_batch(local_batch: Batch, mesh: jax.sharding.Mesh) -> dict:
  """Assembles each process's `[B_local, ...]` arrays into global arrays sharded on the mesh's `data` axis."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}


# ----------------------------------------------------------------------------------------------------
# Iterators.
# ----------------------------------------------------------------------------------------------------


def _host_rows(batch_size: int, process_index: int | None, process_count: int | None, field: str) -> range:
  """This host's rows of each global batch."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f'{field}={batch_size} must be divisible by the number of hosts ({process_count}).')
  local = batch_size // process_count
  return range(process_index * local, (process_index + 1) * local)


def _prefetched(jobs: Iterator[list[Callable[[], dict]]], num_workers: int, prefetch: int) -> Iterator[Batch]:
  """Runs each batch's per-example jobs on a thread pool, `prefetch` batches ahead, in order."""
  def stack(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  if num_workers <= 0:
    for batch_jobs in jobs:
      yield stack([job() for job in batch_jobs])
    return
  executor = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix='input_pipeline')
  pending = collections.deque()
  try:
    for batch_jobs in jobs:
      pending.append([executor.submit(job) for job in batch_jobs])
      if len(pending) > prefetch:
        yield stack([f.result() for f in pending.popleft()])
    while pending:
      yield stack([f.result() for f in pending.popleft()])
  finally:
    executor.shutdown(wait=False)  # Queued jobs (at most `prefetch` batches) just finish.


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  permutation = np.random.default_rng([seed, 0, epoch]).permutation(num_examples)
  permutation.flags.writeable = False
  return permutation


def train_example_index(sample: int, num_examples: int, seed: int) -> int:
  """Dataset index of global training sample `sample` (= step * batch_size + row).

  Each epoch visits every example once, in a permutation drawn from (seed, epoch).
  """
  epoch, position = divmod(sample, num_examples)
  return int(_epoch_permutation(seed, epoch, num_examples)[position])


def create_train_iterator(config: ml_collections.ConfigDict, dataset: Dataset, *, start_step: int = 0,
                          process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[Batch]:
  """Endless iterator of this host's augmented training batches, starting at `start_step`.

  Args:
    config: the full config (dataset, train, model for the mean pixel).
    dataset: `load_dataset(config)`.
    start_step: the first step to produce; the batch for step s is the same whatever the start.
    process_index: this host (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Yields:
    {'image': float32 `[B_local, Hc, Wc, 3]` raw RGB in [0, 255] (padding = mean pixel),
     'label': int32 `[B_local, Hc, Wc]` (padding = ignore label)}, B_local = batch_size / process_count.
  """
  train = config.train
  rows = _host_rows(train.batch_size, process_index, process_count, 'config.train.batch_size')
  source = dataset.source(dataset.train_split)
  num_examples = len(source)
  pad_value = mean_pixel(config.model)

  def make_example(index: int, sample: int) -> dict:
    image, label, _ = _decode(source[index])
    image, label = augment_for_training(
        image, label, np.random.default_rng([train.seed, 1, sample]), crop_size=tuple(train.crop_size),
        min_scale=train.min_scale, max_scale=train.max_scale, scale_step=train.scale_step,
        pad_value=pad_value, ignore_label=config.dataset.ignore_label)
    return {'image': image, 'label': label}

  def jobs():
    step = start_step
    while True:
      samples = [step * train.batch_size + row for row in rows]
      yield [lambda i=train_example_index(s, num_examples, train.seed), s=s: make_example(i, s)
             for s in samples]
      step += 1

  return _prefetched(jobs(), config.dataset.num_workers, config.dataset.prefetch_batches)


def create_eval_iterator(config: ml_collections.ConfigDict, dataset: Dataset, *,
                         process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[Batch]:
  """One pass over the eval split in order, padded to config.eval.crop_size.

  Every host yields the same number of batches, ceil(N / batch_size); rows past the end of the split are
  padding examples with 'mask' False.

  Args:
    config: the full config.
    dataset: `load_dataset(config)`.
    process_index: this host (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Yields:
    {'image': float32 `[B_local, Hc, Wc, 3]` (mean pixel outside the image),
     'label': int32 `[B_local, Hc, Wc]` (ignore label outside the image),
     'mask': bool `[B_local]` (False for padding examples),
     'size': int32 `[B_local, 2]` (each image's height and width before padding; 0 for padding examples)}.
  """
  batch_size = config.eval.batch_size
  rows = _host_rows(batch_size, process_index, process_count, 'config.eval.batch_size')
  source = dataset.source(dataset.eval_split)
  num_examples = dataset.info.num_eval_examples
  crop_size = tuple(config.eval.crop_size)
  pad_value = mean_pixel(config.model)
  ignore_label = config.dataset.ignore_label

  def make_example(position: int) -> dict:
    if position >= num_examples:
      image = np.zeros((0, 0, 3), np.uint8)
      label = np.zeros((0, 0), np.uint8)
      image_id = ''
    else:
      image, label, image_id = _decode(source[position])
    size = np.asarray(label.shape, np.int32)
    image, label = pad_for_eval(image, label, crop_size, pad_value, ignore_label, image_id)
    return {'image': image, 'label': label, 'mask': np.bool_(position < num_examples), 'size': size}

  num_batches = -(-num_examples // batch_size)
  jobs = ([lambda p=b * batch_size + row: make_example(p) for row in rows] for b in range(num_batches))
  return _prefetched(jobs, config.dataset.num_workers, config.dataset.prefetch_batches)
