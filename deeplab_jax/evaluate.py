"""Evaluation: multi-scale + flip inference, confusion matrix on device, mIoU / per-class IoU report.

Inference follows `predict_labels_multi_scale` of the official `research/deeplab/model.py`: for each eval
scale the padded image is resized (align_corners) by `scale_dimension`, the logits at the model's output
resolution are resized to `scale_dimension(crop, max(1, scale) / logits_stride)` (the official merged-logits
size) and then to the image size, and the softmax probabilities of all scales (and their left-right flips)
are averaged before the argmax. Evaluation may run at another output stride than training
(`config.eval.output_stride`); the parameters are the same.
"""
import functools
import json
import os
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image

from deeplab_jax import checkpoint
from deeplab_jax import input_pipeline
from deeplab_jax import metrics
from deeplab_jax.models import create_model
from deeplab_jax.models import layers

Array = jax.Array
PyTree = Any
VOID_COLOUR = (224, 224, 192)  # the colour of label 255 in the VOC palette PNGs


def logits_stride(model_config: ml_collections.ConfigDict, output_stride: int) -> int:
  """Stride of the model's small logits: the decoder's output stride, else the backbone's."""
  if model_config.head == 'aspp' and model_config.decoder_output_stride:
    return model_config.decoder_output_stride
  return output_stride


def predict_probabilities(model, variables: PyTree, images: Array, scales=(1.0,), flip: bool = False,
                          stride: int = 16) -> Array:
  """Class probabilities averaged over eval scales and flips.

  Args:
    model: a DeepLab module (built with the eval output stride).
    variables: `{'params', 'batch_stats'}`.
    images: `[B, H, W, 3]` raw RGB pixels (the padded eval crop).
    scales: image scales (official `eval_scales`).
    flip: also average the left-right flipped images (official `add_flipped_images`).
    stride: `logits_stride(...)`, for the official merged-logits size.

  Returns:
    `[B, H, W, K]` float32 probabilities.
  """
  height, width = images.shape[1], images.shape[2]
  images = images.astype(jnp.float32)
  probabilities = []
  for scale in scales:
    size = (layers.scale_dimension(height, scale), layers.scale_dimension(width, scale))
    scaled = layers.resize_bilinear(images, size)
    merged_size = (layers.scale_dimension(height, max(1.0, scale) / stride),
                   layers.scale_dimension(width, max(1.0, scale) / stride))
    for flipped in ((False, True) if flip else (False,)):
      inputs = scaled[:, :, ::-1] if flipped else scaled
      _, state = model.apply(variables, inputs, train=False, mutable=['intermediates'])
      logits = state['intermediates']['logits_small'][0].astype(jnp.float32)
      if flipped:
        logits = logits[:, :, ::-1]
      logits = layers.resize_bilinear(layers.resize_bilinear(logits, merged_size), (height, width))
      probabilities.append(jax.nn.softmax(logits, axis=-1))
  return sum(probabilities) / len(probabilities)


def eval_step(variables: PyTree, batch: dict, *, model, num_classes: int, scales, flip: bool,
              stride: int) -> tuple[Array, Array]:
  """One eval batch -> (`[K, K]` int32 confusion matrix over valid pixels, `[B, H, W]` predictions)."""
  probabilities = predict_probabilities(model, variables, batch['image'], scales, flip, stride)
  predictions = jnp.argmax(probabilities, axis=-1).astype(jnp.int32)
  confusion = metrics.confusion_matrix(batch['label'], predictions, num_classes, batch['mask'])
  return confusion, predictions


def voc_palette(num_colours: int = 256) -> np.ndarray:
  """`[N, 3]` uint8 PASCAL VOC colour map (bit-interleaved class ids), as in the VOC devkit."""
  palette = np.zeros((num_colours, 3), np.uint8)
  for index in range(num_colours):
    value, colour = index, [0, 0, 0]
    for shift in range(7, -1, -1):
      for channel in range(3):
        colour[channel] |= ((value >> channel) & 1) << shift
      value >>= 3
    palette[index] = colour
  return palette


def overlay_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, alpha: float = 0.6) -> np.ndarray:
  """`[H, 3W, 3]` uint8: the image | label colours over it | prediction colours over it."""
  palette = voc_palette()
  image = np.clip(image, 0, 255).astype(np.float32)
  label_colours = palette[label.astype(np.int64) % 256].astype(np.float32)
  label_colours[label == 255] = VOID_COLOUR
  pred_colours = palette[prediction.astype(np.int64) % 256].astype(np.float32)
  blend = lambda colours: (1 - alpha) * image + alpha * colours
  return np.concatenate([image, blend(label_colours), blend(pred_colours)], axis=1).astype(np.uint8)


class Evaluator:
  """Runs the eval split through a jitted, batch-sharded eval step and summarises it."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    _check_divisible('config.eval.batch_size', config.eval.batch_size, jax.device_count())
    if config.eval.output_stride not in (8, 16, 32):
      raise ValueError(f'config.eval.output_stride={config.eval.output_stride} is not one of (8, 16, 32).')
    if not config.eval.scales or min(config.eval.scales) <= 0:
      raise ValueError(f'config.eval.scales={tuple(config.eval.scales)} must be a non-empty list of positive '
                       'scales, e.g. (1.0,) or the official (0.5, 0.75, 1.0, 1.25, 1.5, 1.75).')
    self.num_classes = config.dataset.num_classes
    dataset_info = input_pipeline.load_dataset_info(config)
    self.class_names = tuple(config.dataset.class_names) or tuple(dataset_info.class_names)
    if len(self.class_names) != self.num_classes:
      raise ValueError(f'config.dataset.class_names has {len(self.class_names)} names for '
                       f'config.dataset.num_classes={self.num_classes}.')
    self.model = create_model(config.model, output_stride=config.eval.output_stride)
    self.data_sharding = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    step = functools.partial(
        eval_step, model=self.model, num_classes=self.num_classes, scales=tuple(config.eval.scales),
        flip=bool(config.eval.flip), stride=logits_stride(config.model, config.eval.output_stride))
    self._eval_step = jax.jit(step, in_shardings=(replicated, self.data_sharding),
                              out_shardings=(replicated, self.data_sharding))

  def batches(self) -> Iterable[dict]:
    return input_pipeline.create_eval_iterator(
        self.config, process_index=jax.process_index(), process_count=jax.process_count())

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
      batch = {key: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(value))
               for key, value in local_batch.items()}
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
    return [overlay_panel(np.asarray(gathered['image'][i]), np.asarray(gathered['label'][i]), predictions[i])
            for i in valid]


def _check_divisible(field: str, value: int, devices: int) -> None:
  if value <= 0 or value % devices:
    raise ValueError(f'{field}={value} must be a multiple of the number of devices ({devices}).')


def save_panels(panels: list[np.ndarray], directory: str, min_height: int = 256) -> list[str]:
  """Writes overlay panels as PNGs into `directory` (small ones enlarged, nearest); returns their paths."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for index, panel in enumerate(panels):
    path = os.path.join(directory, f'{index:02d}.png')
    factor = max(1, -(-min_height // panel.shape[0]))
    Image.fromarray(np.repeat(np.repeat(panel, factor, axis=0), factor, axis=1)).save(path)
    paths.append(path)
  return paths


def write_summary(summary: dict, step: int, workdir: str) -> str:
  """Writes the eval summary as `<workdir>/eval/step_<step>.json`; returns the path."""
  directory = os.path.join(workdir, 'eval')
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f'step_{step:07d}.json')
  with open(path, 'w') as f:
    json.dump(dict(summary, step=step), f, indent=1)
  return path


def restore_variables(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                      model) -> tuple[PyTree, int]:
  """The variables to evaluate: the latest checkpoint in `workdir`, else `config.init_from`.

  Returns:
    `(variables, step)`; step is 0 for `init_from` weights.
  """
  replicated = NamedSharding(mesh, P())
  images = jnp.zeros((1, *config.eval.crop_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, images, train=False))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
  target = {'params': target['params'], 'batch_stats': target.get('batch_stats', {})}
  ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)
  step = None
  if os.path.isdir(ckpt_dir):
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step()
    if step is not None:
      variables, _ = ckpt.restore(step, target, config=config)
      ckpt.close()
      return variables, step
  if config.init_from:
    variables, report = checkpoint.load_pretrained(config.init_from, target, scope='all')
    if report['new']:
      raise checkpoint.CheckpointError(
          f'config.init_from={config.init_from!r} lacks {len(report["new"])} variables of this model, e.g. '
          f'{report["new"][:3]}; it cannot be evaluated as is.')
    return variables, 0
  raise checkpoint.CheckpointError(
      f'Nothing to evaluate: no checkpoint in {ckpt_dir} and config.init_from is empty.')


def evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh) -> dict:
  """`--mode=eval`: evaluates the latest checkpoint of `workdir` (or `config.init_from`), prints the table.

  Args:
    config: the full config.
    workdir: the run directory holding `checkpoints/`; eval JSON and overlay PNGs are written there.
    mesh: `train.create_mesh()`.

  Returns:
    The summary dict (miou, pixel_accuracy, per_class_iou, num_images, ...).
  """
  evaluator = Evaluator(config, mesh)
  variables, step = restore_variables(config, workdir, mesh, evaluator.model)
  summary, panels = evaluator.run(variables, config.eval.num_images_to_save)
  if jax.process_index() == 0:
    print(f'Evaluation of step {step} on {config.dataset.name}/{config.dataset.eval_split} '
          f'({summary["num_images"]} images, output stride {config.eval.output_stride}, '
          f'scales {tuple(config.eval.scales)}, flip {bool(config.eval.flip)}):')
    print(metrics.format_iou_table(summary), flush=True)
    write_summary(summary, step, workdir)
    save_panels(panels, os.path.join(workdir, 'predictions', f'eval_step_{step:07d}'))
  return summary
