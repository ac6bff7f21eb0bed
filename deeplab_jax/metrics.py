"""Segmentation metrics: confusion matrix on device, IoU / mIoU / pixel accuracy on host.

mIoU follows `tf.metrics.mean_iou`, which the official DeepLab `eval.py` reports: the IoU of class `c` is
`cm[c, c] / (row_sum[c] + col_sum[c] - cm[c, c])`, and the mean runs over classes whose denominator is
non-zero (a class neither present in the labels nor ever predicted is left out, not counted as 0).
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def confusion_matrix(labels: Array, predictions: Array, num_classes: int,
                     valid_mask: Optional[Array] = None) -> Array:
  """Counts of (label, prediction) pairs over valid pixels.

  Args:
    labels: `[B, H, W]` integer ground truth; ids outside `[0, num_classes)` (e.g. 255) never count.
    predictions: `[B, H, W]` integer predicted class ids.
    num_classes: K.
    valid_mask: optional `[B, H, W]` or `[B]` bool/float; zero entries never count (padding examples).

  Returns:
    `[K, K]` int32 matrix, rows indexed by the label and columns by the prediction.
  """
  # int32 first: `labels * num_classes` would wrap around for uint8 labels (PNG masks).
  labels = labels.astype(jnp.int32)
  predictions = predictions.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  if valid_mask is not None:
    valid_mask = valid_mask.astype(bool)
    valid = valid & valid_mask.reshape(valid_mask.shape + (1,) * (labels.ndim - valid_mask.ndim))
  index = jnp.where(valid, labels * num_classes + jnp.clip(predictions, 0, num_classes - 1), 0)
  counts = jnp.bincount(index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
  """`[K]` float64 IoU per class; NaN for a class absent from both labels and predictions."""
  confusion = np.asarray(confusion, np.float64)
  true_positives = np.diag(confusion)
  denominator = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positives
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(denominator > 0, true_positives / denominator, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
  """Mean of the per-class IoUs over classes that occur (as `tf.metrics.mean_iou`); 0 if none does."""
  ious = per_class_iou(confusion)
  present = ~np.isnan(ious)
  return float(ious[present].mean()) if present.any() else 0.0


def pixel_accuracy(confusion: np.ndarray) -> float:
  """Fraction of valid pixels whose predicted class is right."""
  confusion = np.asarray(confusion, np.float64)
  total = confusion.sum()
  return float(np.trace(confusion) / total) if total > 0 else 0.0


def summarize(confusion: np.ndarray, class_names: Sequence[str]) -> dict:
  """All evaluation figures from one confusion matrix.

  Returns:
    `{'miou', 'pixel_accuracy', 'num_pixels', 'per_class_iou': {name: iou or NaN}}`.
  """
  ious = per_class_iou(confusion)
  if len(class_names) != len(ious):
    raise ValueError(f'{len(class_names)} class names for a {len(ious)}-class confusion matrix.')
  return {
      'miou': mean_iou(confusion),
      'pixel_accuracy': pixel_accuracy(confusion),
      'num_pixels': int(np.asarray(confusion).sum()),
      'per_class_iou': {str(name): float(iou) for name, iou in zip(class_names, ious)},
  }


def format_iou_table(summary: dict) -> str:
  """A plain-text table: one row per class, then mIoU and pixel accuracy (as percentages)."""
  names = list(summary['per_class_iou'])
  width = max([len('pixel accuracy')] + [len(n) for n in names])
  lines = [f'{"class":<{width}}  IoU (%)', '-' * (width + 9)]
  for name, iou in summary['per_class_iou'].items():
    value = '    n/a' if np.isnan(iou) else f'{100 * iou:7.2f}'
    lines.append(f'{name:<{width}}  {value}')
  lines.append('-' * (width + 9))
  lines.append(f'{"mIoU":<{width}}  {100 * summary["miou"]:7.2f}')
  lines.append(f'{"pixel accuracy":<{width}}  {100 * summary["pixel_accuracy"]:7.2f}')
  return '\n'.join(lines)
