"""Training losses of the official DeepLab recipe: masked pixel cross-entropy and L2 weight decay.

Mirrors `add_softmax_cross_entropy_loss_for_each_scale` in tensorflow/models `research/deeplab/utils/train_utils.py`:
pixels labelled `ignore_label` get weight 0, the loss is the sum of pixel losses divided by the number of
weighted pixels, and with `top_k_percent_pixels < 1` only the largest `k = int(top_k_percent_pixels * num_pixels)`
pixel losses of the whole global batch count (hard pixel mining), divided by how many of them are non-zero.
"""
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


def pixel_cross_entropy(logits: Array, labels: Array, ignore_label: int = 255) -> tuple[Array, Array]:
  """Per-pixel softmax cross-entropy with ignored pixels zeroed.

  Args:
    logits: `[B, H, W, K]` unnormalised class scores (any float dtype; computed in float32).
    labels: `[B, H, W]` integer class ids; `ignore_label` (and any id outside `[0, K)`) is ignored.
    ignore_label: the label id that carries no loss (255 for VOC borders and padding).

  Returns:
    `(pixel_losses, valid_mask)`, both `[B, H, W]` float32; `pixel_losses` is 0 where `valid_mask` is 0.
  """
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  valid_mask = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid_mask, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  valid_mask = valid_mask.astype(jnp.float32)
  return nll * valid_mask, valid_mask


def segmentation_loss(logits: Array, labels: Array, ignore_label: int = 255,
                      top_k_percent_pixels: float = 1.0) -> Array:
  """The official DeepLab pixel loss (mean over labelled pixels, or over the hardest top-k pixels).

  Args:
    logits: `[B, H, W, K]` logits at label resolution.
    labels: `[B, H, W]` integer labels.
    ignore_label: label id excluded from the loss.
    top_k_percent_pixels: in `(0, 1]`; below 1 keeps only the largest pixel losses of the whole batch.

  Returns:
    A float32 scalar; 0 when no pixel is labelled (the official `_div_maybe_zero`).
  """
  if not 0.0 < top_k_percent_pixels <= 1.0:
    raise ValueError(f'config.train.top_k_percent_pixels must be in (0, 1], got {top_k_percent_pixels}.')
  pixel_losses, valid_mask = pixel_cross_entropy(logits, labels, ignore_label)
  if top_k_percent_pixels == 1.0:
    total, count = jnp.sum(pixel_losses), jnp.sum(valid_mask)
  else:
    flat = pixel_losses.reshape(-1)
    k = max(int(top_k_percent_pixels * flat.shape[0]), 1)
    top_losses, _ = jax.lax.top_k(flat, k)
    total = jnp.sum(top_losses)
    count = jnp.sum((top_losses != 0.0).astype(jnp.float32))
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def _path_names(path) -> list[str]:
  return [str(getattr(key, 'key', getattr(key, 'name', key))) for key in path]


def is_decayed_weight(path) -> bool:
  """Whether the official recipe puts an L2 regulariser on this parameter.

  slim's arg scopes regularise convolution (and fully connected) `weights` only: not BatchNorm gamma/beta,
  not `biases`, and not depthwise weights (`regularize_depthwise=False` in Xception and MobileNetV2, and the
  ASPP/decoder `split_separable_conv2d` passes `weights_regularizer=None` to its depthwise half).

  Args:
    path: a `jax.tree_util` key path into the `params` tree.
  """
  names = _path_names(path)
  if not names or names[-1] != 'kernel':
    return False
  return not any('depthwise' in name for name in names[:-1])


def weight_decay_mask(params: PyTree) -> PyTree:
  """A pytree of bools matching `params`: True for the weights the official recipe regularises."""
  return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed_weight(path), params)


def l2_regularization(params: PyTree, weight_decay: float) -> Array:
  """`weight_decay * sum(||w||^2) / 2` over regularised weights, as slim's `l2_regularizer` (tf.nn.l2_loss).

  Its gradient is `weight_decay * w`, which the official trainer adds to the loss before SGD.
  """
  leaves = [jnp.sum(jnp.square(leaf.astype(jnp.float32)))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if is_decayed_weight(path)]
  if not leaves or weight_decay == 0.0:
    return jnp.zeros((), jnp.float32)
  return 0.5 * weight_decay * sum(leaves)
