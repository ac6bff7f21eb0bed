"""Prediction: segment images (files, folders, globs or arrays) with a trained or converted checkpoint.

    python -m deeplab_jax.predict --checkpoint=DIR --input=IMAGE_OR_DIR_OR_GLOB --output=DIR \
        [--eval_scales=0.5,0.75,1.0,1.25,1.5,1.75] [--flip] [--output_stride=8] [--save_probabilities]

writes, per image, `labels/<name>.png` (palette PNG of class indices in the dataset's colours),
`overlays/<name>.png` (image | colour mask, legend of the classes present) and, on request,
`probabilities/<name>.npy` (`[H, W, K]` float32), plus `predictions.json` (settings, files, skipped files).
In Python: `Predictor.from_checkpoint(DIR)(images)` -> labels (and probabilities).

Each image gets exactly what `--mode=eval` computes: the image is padded top-left to the checkpoint's
eval crop (`config.eval.crop_size`) with the model's mean pixel, run through
`evaluate.predict_probabilities` (the eval scales, flips and output stride of `config.eval` unless
overridden), and the probabilities are cropped back to the image. Images larger than the crop cannot be
padded to it; `large_images` chooses what happens to them:
  * 'resize' (default): the image is resized (bilinear) to fit the crop, keeping its aspect ratio, as the
    official `resize_to_range` preprocessing does; the probabilities are resized back to the image size
    (bilinear) before the argmax. Every image then runs at the crop size: one compiled shape in all.
  * 'pad': the image is padded to a bigger canvas, `crop + k * (crop - 1)` on each side that needs it
    (513 -> 1025 -> 1537 ... for VOC: still 16k+1), i.e. evaluated as with a larger eval crop. Exact at
    full resolution; memory grows with the image and each canvas size compiles once.
Images are grouped by canvas size ("bucket") and run in fixed-size batches, so a folder of mixed sizes
compiles once per bucket, never once per image.
"""
import collections
import concurrent.futures
import dataclasses
import glob
import json
import os
import sys
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps
from tqdm import tqdm

from deeplab_jax import checkpoint
from deeplab_jax import crf as crf_lib
from deeplab_jax import datasets
from deeplab_jax import evaluate
from deeplab_jax import input_pipeline
from deeplab_jax import visualize
from deeplab_jax.models import create_model
from deeplab_jax.models import mean_pixel

PyTree = Any
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pnm')
LARGE_IMAGE_MODES = ('resize', 'pad')
OUTPUT_STRIDES = (8, 16, 32)


class ImageReadError(ValueError):
  """An input file is not a readable image; the message names the file."""


# ----------------------------------------------------------------------------------------------------
# Reading images.
# ----------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> np.ndarray:
  """`[H, W, 3]` uint8 RGB from a PIL image of any mode.

  Grey, palette, CMYK, YCbCr and the like are converted by PIL; 16/32-bit grey is scaled from 16 bits;
  transparency is composited over white (what an image viewer shows), not dropped.
  """
  if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
    grey = np.asarray(image, np.float64)
    if image.mode != 'F' and grey.max() > 255:
      grey = grey / 257.0  # 16-bit grey to 8 bits.
    grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or (image.mode == 'P' and 'transparency' in image.info):
    rgba = image.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return np.asarray(image.convert('RGB'))


def load_image(path: str) -> np.ndarray:
  """Decodes an image file to `[H, W, 3]` uint8 RGB, upright (EXIF orientation applied).

  Raises:
    ImageReadError: naming the file, for anything PIL cannot decode (not an image, truncated, empty).
  """
  try:
    with Image.open(path) as image:
      image.load()  # Decode now, so that a truncated file fails here and not later.
      return to_rgb(ImageOps.exif_transpose(image))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
    raise ImageReadError(f'{path}: not a readable image ({type(e).__name__}: {e}).') from e


def find_images(pattern: str) -> list[str]:
  """The files `pattern` names: one file, the image files of a folder (sorted), or a glob's matches.

  From a folder, files with an image extension are taken (`IMAGE_EXTENSIONS`); a file or glob match is
  always attempted, so an unreadable one is reported rather than silently left out.

  Raises:
    FileNotFoundError: nothing matches, naming the pattern.
  """
  if os.path.isfile(pattern):
    return [pattern]
  if os.path.isdir(pattern):
    paths = sorted(os.path.join(pattern, name) for name in os.listdir(pattern)
                   if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, name)))
    if not paths:
      raise FileNotFoundError(f'--input={pattern}: the folder holds no image files '
                              f'({", ".join(IMAGE_EXTENSIONS)}).')
    return paths
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f'--input={pattern}: no such file or folder, and no file matches it as a glob.')
  return paths


def output_names(paths: Sequence[str]) -> list[str]:
  """Unique output base names: the file stem, with its extension (and then a number) where stems collide."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  counts = collections.Counter(stems)
  names, used = [], set()
  for stem, path in zip(stems, paths):
    name = stem if counts[stem] == 1 else f'{stem}_{os.path.splitext(path)[1].lstrip(".").lower()}'
    candidate, number = name, 2
    while candidate in used:
      candidate, number = f'{name}_{number}', number + 1
    used.add(candidate)
    names.append(candidate)
  return names


# ----------------------------------------------------------------------------------------------------
# Shapes: how each image is fed to the model.
# ----------------------------------------------------------------------------------------------------


def grow_to_bucket(size: int, crop: int) -> int:
  """`crop` if `size` fits, else the smallest `crop + k * (crop - 1)` >= size (16k+1 stays 16k+1)."""
  if size <= crop:
    return crop
  step = max(1, crop - 1)
  return crop + -(-(size - crop) // step) * step


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one image runs: resized to `model_size` (== its size unless shrunk) and padded to `bucket`."""
  size: tuple[int, int]
  model_size: tuple[int, int]
  bucket: tuple[int, int]

  @property
  def resized(self) -> bool:
    return self.model_size != self.size


def plan(height: int, width: int, crop_size: Sequence[int], large_images: str = 'resize') -> Plan:
  """The model input size and canvas ("bucket") of a `height` x `width` image; see the module docstring."""
  crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
  if large_images not in LARGE_IMAGE_MODES:
    raise ValueError(f'large_images={large_images!r} is not one of {LARGE_IMAGE_MODES}.')
  if height <= crop_h and width <= crop_w:
    return Plan((height, width), (height, width), (crop_h, crop_w))
  if large_images == 'pad':
    bucket = (grow_to_bucket(height, crop_h), grow_to_bucket(width, crop_w))
    return Plan((height, width), (height, width), bucket)
  scale = min(crop_h / height, crop_w / width)
  model_size = (min(crop_h, max(1, round(height * scale))), min(crop_w, max(1, round(width * scale))))
  return Plan((height, width), model_size, (crop_h, crop_w))


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Half-pixel-centre bilinear taps (lower, upper, weight of upper) mapping `in_size` -> `out_size`."""
  positions = np.clip((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0, in_size - 1)
  lower = np.floor(positions).astype(np.int64)
  upper = np.minimum(lower + 1, in_size - 1)
  return lower, upper, (positions - lower).astype(np.float32)


def resize_probabilities(probabilities: np.ndarray, size: Sequence[int],
                         rows: slice = slice(None)) -> np.ndarray:
  """Bilinear (half-pixel centres, matching the PIL image resize) `[h, w, K]` -> `[size, K]` rows `rows`."""
  lower, upper, frac = (t[rows] for t in _linear_taps(probabilities.shape[0], int(size[0])))
  x = probabilities[lower] * (1 - frac)[:, None, None] + probabilities[upper] * frac[:, None, None]
  lower, upper, frac = _linear_taps(probabilities.shape[1], int(size[1]))
  return x[:, lower] * (1 - frac)[None, :, None] + x[:, upper] * frac[None, :, None]


def _labels_at(probabilities: np.ndarray, size: Sequence[int], chunk_rows: int = 64) -> np.ndarray:
  """argmax of the probabilities resized to `size`, a band of rows at a time (bounded memory)."""
  labels = np.empty(tuple(size), np.int32)
  for start in range(0, int(size[0]), chunk_rows):
    band = slice(start, min(int(size[0]), start + chunk_rows))
    labels[band] = np.argmax(resize_probabilities(probabilities, size, band), axis=-1)
  return labels


@dataclasses.dataclass
class Prediction:
  """One image's result at its own size: `labels` `[H, W]` int32, `probabilities` `[H, W, K]` or None."""
  labels: np.ndarray
  probabilities: Optional[np.ndarray] = None


# ----------------------------------------------------------------------------------------------------
# The predictor.
# ----------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str, step: Optional[int] = None) -> tuple[str, int]:
  """`(workdir, step)` for a run/converted-model dir, its `checkpoints/` dir, or one step dir.

  Raises:
    checkpoint.CheckpointError: naming the path and what was expected.
  """
  path = os.path.abspath(path)
  base, parent = os.path.basename(path), os.path.dirname(path)
  if os.path.isdir(os.path.join(path, checkpoint.CHECKPOINT_SUBDIR)):
    workdir = path
  elif base == checkpoint.CHECKPOINT_SUBDIR and os.path.isdir(path):
    workdir = parent
  elif base.isdigit() and os.path.basename(parent) == checkpoint.CHECKPOINT_SUBDIR and os.path.isdir(path):
    workdir, step = os.path.dirname(parent), int(base) if step is None else step
  else:
    raise checkpoint.CheckpointError(
        f'--checkpoint={path}: expected a training workdir or a converted model (a folder holding '
        f'{checkpoint.CHECKPOINT_SUBDIR}/<step>/), its {checkpoint.CHECKPOINT_SUBDIR}/ folder, or one step '
        'folder.')
  if step is None:
    steps = [int(n) for n in os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)) if n.isdigit()]
    if not steps:
      raise checkpoint.CheckpointError(f'--checkpoint={path}: no checkpoint step in '
                                       f'{os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)}.')
    step = max(steps)
  return workdir, step


def load_checkpoint(path: str, step: Optional[int] = None) -> tuple[PyTree, ml_collections.ConfigDict, int]:
  """`(variables as numpy, config, step)` of a checkpoint (latest step unless `step` is given), read-only.

  Every variable of the model that the saved config builds must be in the checkpoint; names are matched
  '/'-joined, as `checkpoint.load_pretrained` does, so converted and trained checkpoints load alike.

  Raises:
    checkpoint.CheckpointError: naming the checkpoint and what is missing or damaged.
  """
  workdir, step = resolve_checkpoint(path, step)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False, read_only=True)
  try:
    if step not in ckpt.all_steps():
      raise checkpoint.CheckpointError(f'--checkpoint={path}: no step {step}; available: {ckpt.all_steps()}.')
    config = ml_collections.ConfigDict(ckpt.saved_config(step))
  finally:
    ckpt.close()
  model = create_model(config.model)
  # Parameter shapes do not depend on the input size: trace at a small one.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 65, 65, 3)), train=False))
  target = {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
  step_dir = os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR, str(step))
  variables, _ = checkpoint.load_pretrained(step_dir, target, scope='all', min_loaded_fraction=1.0)
  return jax.tree.map(np.asarray, variables), config, step


def eval_protocol(config: ml_collections.ConfigDict, output_stride: Optional[int] = None,
                  scales: Optional[Sequence[float]] = None, flip: Optional[bool] = None
                  ) -> tuple[int, tuple[float, ...], bool]:
  """`(output_stride, scales, flip)`: the arguments where given, else the checkpoint's `config.eval`.

  Raises:
    ValueError: naming the setting, for an output stride not in (8, 16, 32) or a non-positive scale.
  """
  output_stride = int(output_stride or config.eval.output_stride)
  scales = tuple(float(s) for s in (scales if scales is not None else config.eval.scales))
  flip = bool(config.eval.flip if flip is None else flip)
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f'output_stride={output_stride} (--output_stride or config.eval.output_stride) is not '
                     f'one of {OUTPUT_STRIDES}.')
  if not scales or min(scales) <= 0:
    raise ValueError(f'eval scales {scales} (--eval_scales or config.eval.scales) must be a non-empty list '
                     'of positive scales, e.g. 1.0 or 0.5,0.75,1.0,1.25,1.5,1.75.')
  return output_stride, scales, flip


class Predictor:
  """Segments images as `--mode=eval` would; see the module docstring.

  `predictor(images)` takes one `[H, W, 3]` image, a `[B, H, W, 3]` array or a list of images of any sizes
  (uint8 or float RGB in [0, 255]) and returns labels (`[H, W]` int32 each, stacked for an array input), or
  `(labels, probabilities)` with `return_probabilities=True`.

  Attributes:
    num_compiles: how many times the model function was traced and compiled (once per bucket shape).
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: PyTree, *,
               output_stride: Optional[int] = None, scales: Optional[Sequence[float]] = None,
               flip: Optional[bool] = None, crf: Optional[bool] = None,
               large_images: str = 'resize', batch_size: int = 1):
    """Builds the predictor.

    Args:
      config: the checkpoint's full config (model, dataset for class names/colours, eval protocol).
      variables: `{'params', 'batch_stats'}`.
      output_stride: eval output stride; default `config.eval.output_stride`.
      scales: eval scales; default `config.eval.scales`.
      flip: add left-right flipped inputs; default `config.eval.flip`.
      crf: refine with the dense CRF of `config.eval.crf` (its parameters); default `config.eval.crf.enabled`.
      large_images: 'resize' or 'pad', for images larger than `config.eval.crop_size`.
      batch_size: images per model call (each call has this batch size; short batches are padded).
    """
    self.config = config
    self.output_stride, self.scales, self.flip = eval_protocol(config, output_stride, scales, flip)
    if crf and config.eval.get('crf') is None:
      raise ValueError('crf=True, but the checkpoint config has no eval.crf parameters.')
    self.crf = evaluate.crf_params(config) if crf is None else (
        crf_lib.CRFParams.from_config(config.eval.crf) if crf else None)
    if large_images not in LARGE_IMAGE_MODES:
      raise ValueError(f'large_images={large_images!r} is not one of {LARGE_IMAGE_MODES}.')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1.')
    self.large_images = large_images
    self.batch_size = int(batch_size)
    self.crop_size = tuple(int(c) for c in config.eval.crop_size)
    self.pad_value = mean_pixel(config.model)
    self.class_names = datasets.class_names(config.dataset)
    self.palette = visualize.colormap(config.dataset.name)
    self.model = create_model(config.model, output_stride=self.output_stride)
    self.variables = jax.device_put(jax.tree.map(np.asarray, variables))
    self.num_compiles = 0
    self._predict_batch = jax.jit(self._probabilities_and_labels)

  @classmethod
  def from_checkpoint(cls, path: str, step: Optional[int] = None, **kwargs) -> 'Predictor':
    """A predictor for a workdir / converted model / step dir; `kwargs` as for `__init__`."""
    variables, config, _ = load_checkpoint(path, step)
    return cls(config, variables, **kwargs)

  def settings(self) -> dict:
    """The protocol in use, for logs and `predictions.json`."""
    return {'crop_size': list(self.crop_size), 'output_stride': self.output_stride,
            'scales': list(self.scales), 'flip': self.flip,
            'crf': dataclasses.asdict(self.crf) if self.crf is not None else None, 'large_images': self.large_images,
            'batch_size': self.batch_size, 'dataset': self.config.dataset.name,
            'class_names': list(self.class_names)}

  def _probabilities_and_labels(self, variables: PyTree, images: jax.Array,
                                sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    self.num_compiles += 1  # Python runs this only while tracing: once per new input shape.
    probabilities = evaluate.predict_probabilities(self.model, variables, images, self.scales, self.flip)
    if self.crf is not None:
      probabilities = evaluate.refine_with_crf(probabilities, images, sizes, self.crf)
    return jnp.argmax(probabilities, axis=-1).astype(jnp.int32), probabilities

  def plan(self, height: int, width: int) -> Plan:
    return plan(height, width, self.crop_size, self.large_images)

  def _model_input(self, image: np.ndarray, image_plan: Plan) -> np.ndarray:
    """The image at its model size, padded to its bucket with the mean pixel (as the eval pipeline pads)."""
    if image_plan.resized:
      height, width = image_plan.model_size
      image = np.asarray(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize((width, height),
                                                                                             Image.BILINEAR))
    blank_label = np.zeros(image.shape[:2], np.uint8)
    padded, _ = input_pipeline.pad_to_size(image, blank_label, *image_plan.bucket, self.pad_value, 0)
    return padded

  def _run_batch(self, items: list, with_probabilities: bool) -> Iterator[tuple[Any, Prediction]]:
    bucket = items[0][2].bucket
    batch = np.empty((self.batch_size, *bucket, 3), np.float32)
    batch[...] = np.asarray(self.pad_value, np.float32)  # Rows past the images: blank canvases.
    sizes = np.zeros((self.batch_size, 2), np.int32)  # each image's region of its canvas (for the CRF)
    for row, (_, image, image_plan) in enumerate(items):
      batch[row] = self._model_input(image, image_plan)
      sizes[row] = image_plan.model_size
    labels, probabilities = self._predict_batch(self.variables, batch, sizes)
    labels = np.asarray(labels)
    need_probabilities = with_probabilities or any(p.resized for _, _, p in items)
    probabilities = np.asarray(probabilities) if need_probabilities else None
    for row, (key, _, image_plan) in enumerate(items):
      height, width = image_plan.size
      if image_plan.resized:
        small = probabilities[row, :image_plan.model_size[0], :image_plan.model_size[1]]
        result = Prediction(_labels_at(small, image_plan.size),
                            resize_probabilities(small, image_plan.size) if with_probabilities else None)
      else:
        result = Prediction(labels[row, :height, :width],
                            probabilities[row, :height, :width] if with_probabilities else None)
      yield key, result

  def predict_stream(self, images: Iterable[tuple[Any, np.ndarray]], with_probabilities: bool = False
                     ) -> Iterator[tuple[Any, Prediction]]:
    """Segments `(key, image)` pairs as they come, batching images of the same bucket.

    Results come as soon as a bucket's batch is full (and all the rest at the end), so their order may
    differ from the input order; each carries its key.
    """
    pending = collections.defaultdict(list)
    for key, image in images:
      image = np.asarray(image)
      if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'Image {key!r}: expected [H, W, 3] RGB pixels, got shape {image.shape}.')
      image_plan = self.plan(*image.shape[:2])
      pending[image_plan.bucket].append((key, image, image_plan))
      if len(pending[image_plan.bucket]) == self.batch_size:
        yield from self._run_batch(pending.pop(image_plan.bucket), with_probabilities)
    for bucket in list(pending):
      yield from self._run_batch(pending.pop(bucket), with_probabilities)

  def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]], return_probabilities: bool = False):
    """Labels (and probabilities) of one image, a `[B, H, W, 3]` array or a list of images."""
    single = getattr(images, 'ndim', None) == 3
    batch = [images] if single else list(images)
    results = dict(self.predict_stream(enumerate(batch), with_probabilities=return_probabilities))
    labels = [results[i].labels for i in range(len(batch))]
    probabilities = [results[i].probabilities for i in range(len(batch))]
    if single:
      labels, probabilities = labels[0], probabilities[0]
    elif hasattr(images, 'shape'):
      labels, probabilities = np.stack(labels), (np.stack(probabilities) if return_probabilities else None)
    return (labels, probabilities) if return_probabilities else labels


# ----------------------------------------------------------------------------------------------------
# Writing results.
# ----------------------------------------------------------------------------------------------------


def write_outputs(output_dir: str, name: str, image: np.ndarray, result: Prediction, predictor: Predictor,
                  overlay: bool = True) -> dict:
  """Writes `labels/<name>.png`, `overlays/<name>.png` and `probabilities/<name>.npy` (when present).

  Returns:
    `{'label': path, 'overlay': path, 'probabilities': path}` for what was written.
  """
  paths = {'label': os.path.join(output_dir, 'labels', f'{name}.png')}
  visualize.write_label_png(paths['label'], result.labels, predictor.palette)
  if overlay:
    paths['overlay'] = os.path.join(output_dir, 'overlays', f'{name}.png')
    panel = visualize.prediction_overlay(image, result.labels, predictor.class_names, predictor.palette)
    Image.fromarray(panel).save(paths['overlay'])
  if result.probabilities is not None:
    paths['probabilities'] = os.path.join(output_dir, 'probabilities', f'{name}.npy')
    np.save(paths['probabilities'], result.probabilities.astype(np.float32))
  return paths


def _prefetch(function, arguments: Sequence, executor: concurrent.futures.Executor, depth: int) -> Iterator:
  """`(argument, future of function(argument))` in order, with at most `depth` running ahead."""
  queue = collections.deque()
  for argument in arguments:
    queue.append((argument, executor.submit(function, argument)))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def predict_files(predictor: Predictor, paths: Sequence[str], output_dir: str, *,
                  save_probabilities: bool = False, overlay: bool = True, num_workers: int = 4,
                  progress: bool = True) -> dict:
  """Segments image files and writes the results under `output_dir`; unreadable files are skipped.

  Returns:
    `{'settings', 'images': {path: {'size', 'label', 'overlay', ...}}, 'skipped': {path: reason}}`, also
    written to `<output_dir>/predictions.json`.
  """
  for sub in ('labels', 'overlays' if overlay else None, 'probabilities' if save_probabilities else None):
    if sub:
      os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
  names = dict(zip(paths, output_names(paths)))
  summary = {'settings': predictor.settings(), 'images': {}, 'skipped': {}}
  bar = tqdm(total=len(paths), unit='image', file=sys.stderr, disable=not progress, dynamic_ncols=True)
  images = {}

  def decoded() -> Iterator[tuple[str, np.ndarray]]:
    for path, future in _prefetch(load_image, paths, executor, depth=2 * num_workers + predictor.batch_size):
      try:
        images[path] = future.result()
      except ImageReadError as e:
        summary['skipped'][path] = str(e)
        bar.write(f'Skipped {e}', file=sys.stderr)
        bar.update(1)
        continue
      yield path, images[path]

  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as executor:
    writes = []
    for path, result in predictor.predict_stream(decoded(), with_probabilities=save_probabilities):
      image = images.pop(path)
      future = executor.submit(write_outputs, output_dir, names[path], image, result, predictor, overlay)
      writes.append((path, image.shape[:2], future))
      while writes and (writes[0][2].done() or len(writes) > 2 * num_workers):
        done_path, size, future = writes.pop(0)
        summary['images'][done_path] = dict(size=list(size), **future.result())
        bar.update(1)
    for done_path, size, future in writes:
      summary['images'][done_path] = dict(size=list(size), **future.result())
      bar.update(1)
  bar.close()
  with open(os.path.join(output_dir, 'predictions.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv: Sequence[str]) -> int:
  """`python -m deeplab_jax.predict`: see the module docstring and `--help`."""
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  quiet_checkpoint_logs(FLAGS)
  protocol = protocol_from_flags(FLAGS)
  predictor = Predictor.from_checkpoint(FLAGS.checkpoint, FLAGS.step, crf=FLAGS.crf,
                                        large_images=FLAGS.large_images, batch_size=FLAGS.batch_size,
                                        **protocol)
  paths = find_images(FLAGS.input)
  settings = predictor.settings()
  print(f'Segmenting {len(paths)} file(s) from {FLAGS.input} into {FLAGS.output}: {settings["dataset"]} '
        f'({len(predictor.class_names)} classes), eval crop {settings["crop_size"]}, output stride '
        f'{settings["output_stride"]}, scales {tuple(settings["scales"])}, flip {settings["flip"]}, '
        f'dense CRF {"on" if predictor.crf else "off"}, large images: {settings["large_images"]}.', flush=True)
  summary = predict_files(predictor, paths, FLAGS.output, save_probabilities=FLAGS.save_probabilities,
                          overlay=FLAGS.overlays, num_workers=FLAGS.num_workers)
  print(f'Wrote {len(summary["images"])} label PNGs to {os.path.join(FLAGS.output, "labels")}'
        + (f' and overlays to {os.path.join(FLAGS.output, "overlays")}' if FLAGS.overlays else '')
        + f' ({predictor.num_compiles} compiled shape(s)).')
  if summary['skipped']:
    print(f'Skipped {len(summary["skipped"])} unreadable file(s):')
    for reason in summary['skipped'].values():
      print(f'  {reason}')
  return 0 if summary['images'] else 1


def define_checkpoint_and_protocol_flags() -> None:
  """The flags `predict` and `export` share: which checkpoint, and overrides of its eval protocol."""
  flags.DEFINE_string('checkpoint', None, 'Training workdir or converted model dir (holding checkpoints/), '
                      'its checkpoints/ dir, or one step dir.', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_list('eval_scales', None, 'Eval scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (default: the '
                    "checkpoint's config.eval.scales).")
  flags.DEFINE_bool('flip', None, "Also average left-right flips (default: the checkpoint's "
                    'config.eval.flip).')
  flags.DEFINE_integer('output_stride', None, "8, 16 or 32 (default: the checkpoint's "
                       'config.eval.output_stride).')


def quiet_checkpoint_logs(flag_values) -> None:
  """WARNING verbosity unless `--verbosity` was given: orbax's per-read INFO lines would bury the progress."""
  if not flag_values['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def protocol_from_flags(flag_values) -> dict:
  """`output_stride`, `scales`, `flip` from those flags (None: the checkpoint's)."""
  return dict(output_stride=flag_values.output_stride, flip=flag_values.flip,
              scales=[float(s) for s in flag_values.eval_scales] if flag_values.eval_scales else None)


def _define_flags() -> None:
  """Command-line flags: defined only when run as a program, so importing this module defines none."""
  define_checkpoint_and_protocol_flags()
  flags.DEFINE_string('input', None, 'An image file, a folder of images, or a glob (quote it).',
                      required=True)
  flags.DEFINE_string('output', None, 'Output folder (labels/, overlays/, probabilities/, predictions.json).',
                      required=True)
  flags.DEFINE_bool('crf', None, "Refine with the dense CRF of the checkpoint's config.eval.crf (default: "
                    'config.eval.crf.enabled, on for the V1/V2 recipes).')
  flags.DEFINE_bool('save_probabilities', False, 'Also write probabilities/<name>.npy, [H, W, K] float32.')
  flags.DEFINE_bool('overlays', True, 'Write overlays/<name>.png (image | colour mask with a legend).')
  flags.DEFINE_enum('large_images', 'resize', LARGE_IMAGE_MODES,
                    'Images larger than the eval crop: resize them to fit it (one compiled shape), or pad '
                    'them to a larger canvas (full resolution; one compile per canvas size).')
  flags.DEFINE_integer('batch_size', 1, 'Images per model call.')
  flags.DEFINE_integer('num_workers', 4, 'Threads decoding images and writing PNGs.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
