"""Evaluation: multi-scale + flip inference, confusion matrix on device, mIoU / per-class IoU report.

Inference follows `predict_labels_multi_scale` of the official `research/deeplab/model.py`: for each eval
scale the padded image is resized (align_corners) by `scale_dimension`, the logits at the model's output
resolution are resized to `scale_dimension(crop, max(1, scale) / logits_stride)` (the official merged-logits
size) and then to the image size, and the softmax probabilities of all scales (and their left-right flips)
are averaged before the argmax. Evaluation may run at another output stride than training
(`config.eval.output_stride`); the parameters are the same. With `config.eval.crf.enabled` (the V1/V2
recipes) the dense CRF refines the averaged probabilities of each image, padding excluded.
"""
import contextlib
import functools
import json
import os
import time
from typing import Any, Iterable, Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image

from deeplab_jax import checkpoint
from deeplab_jax import crf
from deeplab_jax import input_pipeline
from deeplab_jax import metrics
from deeplab_jax import models
from deeplab_jax import visualize
from deeplab_jax.models import create_model
from deeplab_jax.models import layers

Array = jax.Array
PyTree = Any


def predict_probabilities(model, variables: PyTree, images: Array, scales=(1.0,), flip: bool = False) -> Array:
  """Class probabilities averaged over eval scales and flips.

  Args:
    model: a DeepLab module (built with the eval output stride).
    variables: `{'params', 'batch_stats'}`.
    images: `[B, H, W, 3]` raw RGB pixels (the padded eval crop).
    scales: image scales (official `eval_scales`).
    flip: also average the left-right flipped images (official `add_flipped_images`).

  Returns:
    `[B, H, W, K]` float32 probabilities.
  """
  height, width = images.shape[1], images.shape[2]
  images = images.astype(jnp.float32)
  stride = model.logits_stride
  probabilities = []
  for scale in scales:
    size = (layers.scale_dimension(height, scale), layers.scale_dimension(width, scale))
    scaled = layers.resize_bilinear(images, size)
    # The official merged-logits size, then the image size.
    merged_size = (layers.scale_dimension(height, max(1.0, scale) / stride),
                   layers.scale_dimension(width, max(1.0, scale) / stride))
    for flipped in ((False, True) if flip else (False,)):
      inputs = scaled[:, :, ::-1] if flipped else scaled
      logits = model.apply(variables, inputs, train=False, upsample=False)
      if flipped:
        logits = logits[:, :, ::-1]
      logits = layers.resize_bilinear(layers.resize_bilinear(logits, merged_size), (height, width))
      probabilities.append(jax.nn.softmax(logits, axis=-1))
  return sum(probabilities) / len(probabilities)


def refine_with_crf(probabilities: Array, images: Array, sizes: Array, params: crf.CRFParams) -> Array:
  """The dense CRF over each image's own pixels: the padding of a padded batch never enters it.

  Args:
    probabilities: `[B, H, W, K]` averaged probabilities of the padded canvases.
    images: `[B, H, W, 3]` raw RGB canvases.
    sizes: `[B, 2]` int32 height and width of each image inside its canvas (top-left).
    params: the CRF parameters (`crf.CRFParams.from_config(config.eval.crf)`).

  Returns:
    `[B, H, W, K]` marginals (the input probabilities outside the images).
  """
  rows = jnp.arange(probabilities.shape[1])[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(probabilities.shape[2])[None, None, :] < sizes[:, 1, None, None]
  return crf.dense_crf(probabilities, images, params, valid_mask=rows & cols)


def crf_params(config: ml_collections.ConfigDict) -> Optional[crf.CRFParams]:
  """`config.eval.crf` as CRF parameters, or None when it is off (or absent from an older config)."""
  crf_config = config.eval.get('crf')
  if crf_config is None or not crf_config.enabled:
    return None
  return crf.CRFParams.from_config(crf_config)


def eval_step(variables: PyTree, batch: dict, *, model, num_classes: int, scales, flip: bool,
              crf_parameters: Optional[crf.CRFParams] = None) -> tuple[Array, Array]:
  """One eval batch -> (`[K, K]` int32 confusion matrix over valid pixels, `[B, H, W]` predictions)."""
  probabilities = predict_probabilities(model, variables, batch['image'], scales, flip)
  if crf_parameters is not None:
    probabilities = refine_with_crf(probabilities, batch['image'], batch['size'], crf_parameters)
  predictions = jnp.argmax(probabilities, axis=-1).astype(jnp.int32)
  confusion = metrics.confusion_matrix(batch['label'], predictions, num_classes, batch['mask'])
  return confusion, predictions


class Evaluator:
  """Runs the eval split through a jitted, batch-sharded eval step and summarises it."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               dataset: input_pipeline.Dataset):
    self.config = config
    self.mesh = mesh
    self.dataset = dataset
    _check_divisible('config.eval.batch_size', config.eval.batch_size, jax.device_count())
    if config.eval.output_stride not in (8, 16, 32):
      raise ValueError(f'config.eval.output_stride={config.eval.output_stride} is not one of (8, 16, 32).')
    if not config.eval.scales or min(config.eval.scales) <= 0:
      raise ValueError(f'config.eval.scales={tuple(config.eval.scales)} must be a non-empty list of positive '
                       'scales, e.g. (1.0,) or the official (0.5, 0.75, 1.0, 1.25, 1.5, 1.75).')
    self.num_classes = dataset.info.num_classes
    self.class_names = dataset.info.class_names
    self.model = create_model(config.model, output_stride=config.eval.output_stride)
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    step = functools.partial(eval_step, model=self.model, num_classes=self.num_classes,
                             scales=tuple(config.eval.scales), flip=bool(config.eval.flip),
                             crf_parameters=crf_params(config))
    self._eval_step = jax.jit(step, in_shardings=(replicated, data), out_shardings=(replicated, data))

  def batches(self) -> Iterable[dict]:
    return input_pipeline.create_eval_iterator(
        self.config, self.dataset, process_index=jax.process_index(), process_count=jax.process_count())

  def run(self, variables: PyTree, num_images_to_save: int = 0) -> tuple[dict, list[np.ndarray]]:
    """Evaluates `variables` on the eval split.

    Returns:
      `(summary, panels)`: `metrics.summarize` output plus 'num_images' and 'seconds', and up to
      `num_images_to_save` overlay panels (`[H, 3W, 3]` uint8) from the first batch.
    """
    start = time.time()
    confusion_total = np.zeros((self.num_classes, self.num_classes), np.int64)
    confusion_device = None
    panels, num_images = [], 0
    for index, local_batch in enumerate(self.batches()):
      batch = input_pipeline.shard_batch(local_batch, self.mesh)
      confusion, predictions = self._eval_step(variables, batch)
      # Sum on device; flush to int64 on host now and then so no int32 count can overflow.
      confusion_device = confusion if confusion_device is None else confusion_device + confusion
      if index % 50 == 49:
        confusion_total += np.asarray(jax.device_get(confusion_device), np.int64)
        confusion_device = None
      num_images += int(np.sum(local_batch['mask']))
      if index == 0 and num_images_to_save > 0:
        panels = self._panels(local_batch, predictions, num_images_to_save)
    if confusion_device is not None:
      confusion_total += np.asarray(jax.device_get(confusion_device), np.int64)
    if jax.process_count() > 1:
      num_images = int(np.sum(multihost_utils.process_allgather(np.asarray(num_images))))
    if num_images == 0:
      raise ValueError(f'The eval split {self.config.dataset.eval_split!r} of {self.config.dataset.name!r} '
                       'yielded no images.')
    summary = metrics.summarize(confusion_total, self.class_names)
    summary.update(num_images=num_images, seconds=time.time() - start, confusion=confusion_total.tolist())
    return summary, panels

  def _panels(self, local_batch: dict, predictions: Array, count: int) -> list[np.ndarray]:
    gathered = {key: np.asarray(multihost_utils.process_allgather(local_batch[key], tiled=True))
                for key in ('image', 'label', 'mask')} if jax.process_count() > 1 else local_batch
    predictions = np.asarray(multihost_utils.process_allgather(predictions, tiled=True))
    valid = np.flatnonzero(np.asarray(gathered['mask']))[:count]
    palette = visualize.colormap(self.config.dataset.name)
    return [visualize.overlay_panel(np.asarray(gathered['image'][i]), np.asarray(gathered['label'][i]),
                                    predictions[i], self.class_names, palette=palette) for i in valid]


def _check_divisible(field: str, value: int, devices: int) -> None:
  if value <= 0 or value % devices:
    raise ValueError(f'{field}={value} must be a multiple of the number of devices ({devices}).')


def save_panels(panels: list[np.ndarray], directory: str, min_height: int = 256) -> list[str]:
  """Writes overlay panels as PNGs into `directory` (small ones enlarged, nearest); returns their paths.

  Raises:
    OSError: naming the file that could not be written (disk full, permissions).
  """
  paths = []
  for index, panel in enumerate(panels):
    path = os.path.join(directory, f'{index:02d}.png')
    factor = max(1, -(-min_height // panel.shape[0]))
    with _naming_path(path):
      os.makedirs(directory, exist_ok=True)
      Image.fromarray(np.repeat(np.repeat(panel, factor, axis=0), factor, axis=1)).save(path)
    paths.append(path)
  return paths


def write_summary(summary: dict, step: int, workdir: str) -> str:
  """Writes the eval summary as `<workdir>/eval/step_<step>.json`; returns the path."""
  directory = os.path.join(workdir, 'eval')
  path = os.path.join(directory, f'step_{step:07d}.json')
  with _naming_path(path):
    os.makedirs(directory, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(dict(summary, step=step), f, indent=1)
  return path


@contextlib.contextmanager
def _naming_path(path: str):
  """Re-raises an OSError (PIL's ENOSPC carries no file name) as one that names `path` and the cause."""
  try:
    yield
  except OSError as e:
    raise OSError(e.errno, f'Cannot write {path}: {e.strerror or e}', path) from e


def restore_variables(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                      model) -> tuple[PyTree, int]:
  """The variables to evaluate: the newest intact checkpoint in `workdir`, else `config.init_from`.

  Variables of this model that `init_from` lacks or holds with another shape (e.g. the logits of a run with
  another class count) keep their initial values and are reported; fewer than
  `config.init_from_min_fraction` loaded stops with the list.

  Returns:
    `(variables, step)`; step is 0 for `init_from` weights.
  """
  replicated = NamedSharding(mesh, P())
  images = jnp.zeros((1, *config.eval.crop_size, 3), jnp.float32)

  def init():
    variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, images, train=False)
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}

  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        jax.eval_shape(init))
  if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)):
    ckpt = checkpoint.Checkpointer(workdir, async_save=False, read_only=True)
    try:
      restored = ckpt.restore_latest_intact(target, config=config)
    finally:
      ckpt.close()
    if restored is not None:
      return restored.variables, restored.step
  if config.init_from:
    variables, report = checkpoint.load_pretrained(
        config.init_from, target, 'all', backbone_scope=models.backbone_scope(config.model),
        min_loaded_fraction=config.init_from_min_fraction,
        init_variables=lambda: jax.jit(init, out_shardings=replicated)())
    if report['skipped'] or report['new']:
      logging.warning('init_from %s: %d variables keep their initial values: %s', config.init_from,
                      len(report['skipped']) + len(report['new']),
                      [f'{name} ({why})' for name, why in report['skipped']][:10] + report['new'][:10])
    return variables, 0
  raise checkpoint.CheckpointError(
      f'Nothing to evaluate: no checkpoint in {os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)} and '
      'config.init_from is empty.')


def evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> dict:
  """`--mode=eval`: evaluates the latest checkpoint of `workdir` (or `config.init_from`), prints the table.

  Args:
    config: the full config.
    workdir: the run directory holding `checkpoints/`; eval JSON and overlay PNGs are written there.
    mesh: `train.create_mesh()`.

  Returns:
    The summary dict (miou, pixel_accuracy, per_class_iou, num_images, ...).
  """
  evaluator = Evaluator(config, mesh, input_pipeline.load_dataset(config))
  variables, step = restore_variables(config, workdir, mesh, evaluator.model)
  summary, panels = evaluator.run(variables, config.eval.num_images_to_save)
  if jax.process_index() == 0:
    print(f'Evaluation of step {step} on {config.dataset.name}/{config.dataset.eval_split} '
          f'({summary["num_images"]} images, output stride {config.eval.output_stride}, '
          f'scales {tuple(config.eval.scales)}, flip {bool(config.eval.flip)}'
          f'{", dense CRF" if crf_params(config) else ""}):')
    print(metrics.format_iou_table(summary), flush=True)
    write_summary(summary, step, workdir)
    save_panels(panels, os.path.join(workdir, 'predictions', f'eval_step_{step:07d}'))
  return summary
