"""Tests for deeplab_jax.metrics against hand-computed confusion matrices and IoUs."""
import jax.numpy as jnp
import numpy as np

from deeplab_jax import metrics


def test_confusion_matrix_hand_example():
  labels = np.array([[[0, 0, 1], [1, 2, 255]]], np.int32)
  preds = np.array([[[0, 1, 1], [1, 0, 2]]], np.int32)
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 3))
  expected = np.array([[1, 1, 0],
                       [0, 2, 0],
                       [1, 0, 0]])
  np.testing.assert_array_equal(cm, expected)


def test_confusion_matrix_ignores_padding_examples_and_pixels():
  labels = np.array([[[0, 1]], [[1, 1]]], np.int32)
  preds = np.array([[[0, 0]], [[0, 0]]], np.int32)
  example_mask = np.array([True, False])
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 2, jnp.asarray(example_mask)))
  np.testing.assert_array_equal(cm, [[1, 0], [1, 0]])
  pixel_mask = np.array([[[False, True]], [[True, False]]])
  cm = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 2, jnp.asarray(pixel_mask)))
  np.testing.assert_array_equal(cm, [[0, 0], [2, 0]])


def test_iou_miou_and_accuracy():
  cm = np.array([[1, 1, 0, 0],
                 [0, 2, 0, 0],
                 [1, 0, 0, 0],
                 [0, 0, 0, 0]])
  iou = metrics.per_class_iou(cm)
  # class 0: 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 0 / 1; class 3 absent -> NaN.
  np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
  assert np.isnan(iou[3])
  # Absent classes are left out of the mean (tf.metrics.mean_iou), a present class with IoU 0 is not.
  np.testing.assert_allclose(metrics.mean_iou(cm), (1 / 3 + 2 / 3 + 0.0) / 3)
  np.testing.assert_allclose(metrics.pixel_accuracy(cm), 3 / 5)


def test_summary_and_table():
  cm = np.array([[3, 1], [0, 4]])
  summary = metrics.summarize(cm, ('background', 'cat'))
  np.testing.assert_allclose(summary['per_class_iou']['background'], 3 / 4)
  np.testing.assert_allclose(summary['per_class_iou']['cat'], 4 / 5)
  np.testing.assert_allclose(summary['miou'], (3 / 4 + 4 / 5) / 2)
  assert summary['num_pixels'] == 8
  table = metrics.format_iou_table(summary)
  assert 'background' in table and '75.00' in table and '80.00' in table and '77.50' in table
  assert 'pixel accuracy' in table and '87.50' in table


def test_empty_confusion_is_zero():
  cm = np.zeros((3, 3), np.int64)
  assert metrics.mean_iou(cm) == 0.0 and metrics.pixel_accuracy(cm) == 0.0


def test_confusion_matrix_of_uint8_labels_does_not_wrap():
  # 21 classes: label 20 * 21 + prediction would wrap around in uint8 (a PNG mask's dtype).
  labels = jnp.asarray([[[20, 13, 255]]], jnp.uint8)
  predictions = jnp.asarray([[[20, 12, 0]]], jnp.uint8)
  confusion = np.asarray(metrics.confusion_matrix(labels, predictions, 21))
  assert confusion.sum() == 2 and confusion[20, 20] == 1 and confusion[13, 12] == 1
