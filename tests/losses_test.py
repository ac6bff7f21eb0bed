"""Tests for deeplab_jax.losses: exact values on hand-built logits, the official weight-decay mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from deeplab_jax import losses
from deeplab_jax.models import create_model


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)


def _example():
  logits = np.array([[[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]],
                      [[0.5, 0.5, 3.0], [1.0, 2.0, 3.0]]]], np.float32)  # [1, 2, 2, 3]
  labels = np.array([[[0, 2], [255, 1]]], np.int32)
  log_probs = _log_softmax(logits)
  nll = {(0, 0): -log_probs[0, 0, 0, 0], (0, 1): -log_probs[0, 0, 1, 2], (1, 1): -log_probs[0, 1, 1, 1]}
  return logits, labels, nll


def test_pixel_cross_entropy_zeroes_ignored_pixels():
  logits, labels, nll = _example()
  pixel_losses, valid = losses.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_array_equal(np.asarray(valid), [[[1, 1], [0, 1]]])
  expected = np.zeros((1, 2, 2))
  for (i, j), value in nll.items():
    expected[0, i, j] = value
  np.testing.assert_allclose(np.asarray(pixel_losses), expected, rtol=1e-6)


def test_segmentation_loss_is_mean_over_labelled_pixels():
  logits, labels, nll = _example()
  loss = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(loss), sum(nll.values()) / 3, rtol=1e-6)


def test_segmentation_loss_all_ignored_is_zero():
  logits, _, _ = _example()
  labels = np.full((1, 2, 2), 255, np.int32)
  assert float(losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels))) == 0.0


def test_top_k_keeps_the_hardest_pixels_of_the_batch():
  logits, labels, nll = _example()
  # 4 pixels (one ignored), top 50% -> k = 2: the two largest pixel losses, divided by 2.
  loss = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), top_k_percent_pixels=0.5)
  np.testing.assert_allclose(float(loss), sum(sorted(nll.values())[-2:]) / 2, rtol=1e-6)
  # 100% of pixels through the top-k path would count 3 non-zero losses: same as the plain mean.
  loss_all = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), top_k_percent_pixels=0.99)
  np.testing.assert_allclose(float(loss_all), sum(nll.values()) / 3, rtol=1e-6)


def test_top_k_rejects_bad_fraction():
  logits, labels, _ = _example()
  with pytest.raises(ValueError, match='top_k_percent_pixels'):
    losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), top_k_percent_pixels=0.0)


def test_l2_regularization_follows_slim_l2_regularizer():
  params = {
      'conv': {'kernel': jnp.full((1, 1, 2, 2), 2.0), 'bias': jnp.ones(2)},
      'conv/BatchNorm': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
      'sep_depthwise': {'kernel': jnp.ones((3, 3, 1, 2))},
      'sep_pointwise': {'kernel': jnp.full((1, 1, 2, 1), 3.0)},
  }
  # slim l2_regularizer(wd)(w) = wd * sum(w^2) / 2 on conv weights only.
  expected = 0.1 * (4 * 4.0 + 2 * 9.0) / 2
  np.testing.assert_allclose(float(losses.l2_regularization(params, 0.1)), expected, rtol=1e-6)
  mask = losses.weight_decay_mask(params)
  assert mask == {'conv': {'kernel': True, 'bias': False}, 'conv/BatchNorm': {'scale': False, 'bias': False},
                  'sep_depthwise': {'kernel': False}, 'sep_pointwise': {'kernel': True}}


def test_weight_decay_mask_on_the_tiny_model():
  config = tiny.get_config()
  model = create_model(config.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)), train=False))
  flat = {'/'.join(str(k.key) for k in path): decayed for path, decayed in
          jax.tree_util.tree_flatten_with_path(losses.weight_decay_mask(shapes['params']))[0]}
  decayed = [name for name, d in flat.items() if d]
  assert any(name.startswith('logits') for name in decayed)
  assert not any('depthwise' in name or 'BatchNorm' in name or name.endswith('bias') for name in decayed)
  # Every regular (non-depthwise) conv kernel is decayed.
  kernels = [name for name in flat if name.endswith('kernel') and 'depthwise' not in name]
  assert sorted(kernels) == sorted(decayed) and kernels
