"""Tests for deeplab_jax.input_pipeline: each op eagerly on hand-built arrays, then inside the pipeline."""
import os

import numpy as np
from PIL import Image
import pytest

from configs import default
from deeplab_jax import input_pipeline as ip

MEAN = (127.5, 127.5, 127.5)
VOC_SUBSET = 'voc2012_train_subset'
# Distinct colours for 21 classes (VOC's colour map), to code labels into images.
PALETTE = np.array([[(c >> 0 & 1) * 128 + (c >> 3 & 1) * 64, (c >> 1 & 1) * 128 + (c >> 4 & 1) * 64,
                     (c >> 2 & 1) * 128] for c in range(21)], np.uint8)


# ----------------------------------------------------------------------------------------------------
# Ops, eagerly, exact values.
# ----------------------------------------------------------------------------------------------------


def test_random_scale_factor_grid():
  rng = np.random.default_rng(0)
  draws = {ip.random_scale_factor(rng, 0.5, 2.0, 0.25) for _ in range(500)}
  assert draws == {0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0}
  uniform = [ip.random_scale_factor(rng, 0.5, 2.0, 0.0) for _ in range(200)]
  assert 0.5 <= min(uniform) < 0.6 and 1.9 < max(uniform) <= 2.0 and len(set(uniform)) == 200
  assert ip.random_scale_factor(rng, 1.0, 1.0, 0.25) == 1.0
  with pytest.raises(ValueError):
    ip.random_scale_factor(rng, 2.0, 1.0, 0.25)


def test_scale_image_and_label_exact():
  label = np.array([[1, 2], [3, 4]], np.uint8)
  image = np.full((2, 2, 3), 10, np.uint8)
  image2, label2 = ip.scale_image_and_label(image, label, 2.0)
  np.testing.assert_array_equal(label2, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
  np.testing.assert_array_equal(image2, np.full((4, 4, 3), 10))  # Bilinear keeps a flat image flat.
  # Sizes are int(d * scale), as the official tf.cast(d * scale, int32).
  image3, label3 = ip.scale_image_and_label(np.zeros((5, 7, 3), np.uint8), np.zeros((5, 7), np.uint8), 0.5)
  assert image3.shape == (2, 3, 3) and label3.shape == (2, 3)
  # Nearest-neighbour labels never invent values; bilinear images do blend.
  ramp = np.repeat(np.array([[0, 200]], np.uint8), 2, axis=0)
  image4, label4 = ip.scale_image_and_label(np.stack([ramp] * 3, -1), np.array([[0, 255], [0, 255]], np.uint8), 1.75)
  assert set(np.unique(label4)) == {0, 255}
  assert len(np.unique(image4)) > 2
  same_image, same_label = ip.scale_image_and_label(image, label, 1.0)
  assert same_image is image and same_label is label


def test_pad_to_size_exact():
  image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  label = np.array([[1, 2], [3, 4]], np.uint8)
  padded_image, padded_label = ip.pad_to_size(image, label, 3, 4, (1.5, 2.5, 3.5), 255)
  assert padded_image.dtype == np.float32 and padded_label.dtype == np.int32
  np.testing.assert_array_equal(padded_label, [[1, 2, 255, 255], [3, 4, 255, 255], [255] * 4])
  np.testing.assert_array_equal(padded_image[:2, :2], image)
  np.testing.assert_array_equal(padded_image[2, 0], [1.5, 2.5, 3.5])
  np.testing.assert_array_equal(padded_image[0, 3], [1.5, 2.5, 3.5])
  big_image, big_label = ip.pad_to_size(image, label, 1, 1, MEAN, 255)  # Never shrinks.
  assert big_image.shape == (2, 2, 3) and big_label.shape == (2, 2)


def test_random_crop_takes_the_same_window():
  label = np.arange(30, dtype=np.int32).reshape(5, 6)
  image = np.stack([label * 2, label * 3, label * 5], -1).astype(np.float32)
  windows = set()
  for seed in range(50):
    crop_image, crop_label = ip.random_crop(image, label, 3, 4, np.random.default_rng(seed))
    assert crop_label.shape == (3, 4) and crop_image.shape == (3, 4, 3)
    top, left = divmod(int(crop_label[0, 0]), 6)
    np.testing.assert_array_equal(crop_label, label[top:top + 3, left:left + 4])
    np.testing.assert_array_equal(crop_image, np.stack([crop_label * 2, crop_label * 3, crop_label * 5], -1))
    windows.add((top, left))
  assert windows == {(t, l) for t in range(3) for l in range(3)}  # Every offset is reachable.
  with pytest.raises(ValueError, match='pad first'):
    ip.random_crop(image, label, 6, 4, np.random.default_rng(0))


def test_random_flip_left_right_flips_both_or_neither():
  label = np.array([[0, 1, 2]], np.int32)
  image = np.array([[[0] * 3, [10] * 3, [20] * 3]], np.float32)
  outcomes = set()
  for seed in range(20):
    flip_image, flip_label = ip.random_flip_left_right(image, label, np.random.default_rng(seed))
    np.testing.assert_array_equal(flip_image[..., 0], flip_label * 10)
    outcomes.add(tuple(flip_label[0]))
  assert outcomes == {(0, 1, 2), (2, 1, 0)}


def test_pad_for_eval_exact_and_too_large_error():
  image = np.full((2, 3, 3), 7, np.uint8)
  label = np.array([[1, 0, 2], [2, 2, 1]], np.uint8)
  padded_image, padded_label = ip.pad_for_eval(image, label, (3, 4), MEAN, 255)
  np.testing.assert_array_equal(padded_label, [[1, 0, 2, 255], [2, 2, 1, 255], [255] * 4])
  np.testing.assert_array_equal(padded_image[:2, :3], image)
  assert np.all(padded_image[2] == 127.5) and np.all(padded_image[:, 3] == 127.5)
  with pytest.raises(ValueError) as error:
    ip.pad_for_eval(image, label, (2, 2), MEAN, 255, image_id='2007_000032')
  assert '2007_000032' in str(error.value) and 'config.eval.crop_size' in str(error.value)
  assert '2x3' in str(error.value)


def test_augment_for_training_keeps_colour_coded_labels_aligned():
  """A label made from the image colour stays consistent through scale + pad + crop + flip."""
  rng = np.random.default_rng(0)
  label = np.kron(rng.integers(0, 21, (6, 8)), np.ones((24, 24), np.int64)).astype(np.uint8)
  label[:, :30] = 255  # Asymmetric, so a flip of only one of the two would show.
  image = PALETTE[np.minimum(label, 20)]
  image[label == 255] = 0
  for seed in range(20):
    aug_image, aug_label = ip.augment_for_training(
        image, label, np.random.default_rng(seed), crop_size=(97, 97), min_scale=0.5, max_scale=2.0,
        scale_step=0.25, pad_value=MEAN, ignore_label=255)
    assert aug_image.shape == (97, 97, 3) and aug_label.shape == (97, 97)
    _assert_colour_coded(aug_image, aug_label)


def _assert_colour_coded(image, label, max_mismatch=0.0):
  """Checks a colour-coded pair: padding is mean pixel + ignore, and unblended colours match the label.

  Bilinear resizing blends colours only where its support straddles a label edge, so a pixel that still
  has exactly a palette colour must carry that colour's label. A 1-pixel shift between image and label
  breaks this along every edge (~0.4% of such pixels on VOC masks); aligned pairs break it only where a
  blend happens to equal another palette colour (~1e-5).
  """
  padding = np.all(image == 127.5, axis=-1)
  assert np.all(label[padding] == 255)
  distance = np.abs(image[:, :, None, :] - PALETTE.astype(np.float32)).max(-1)
  pure = (distance.min(-1) < 0.5) & (label != 255)
  assert pure.sum() > 0.5 * (label != 255).sum()
  mismatch = distance.argmin(-1)[pure] != label[pure]
  assert mismatch.mean() <= max_mismatch, mismatch.mean()


# ----------------------------------------------------------------------------------------------------
# Inside the pipeline.
# ----------------------------------------------------------------------------------------------------


def _config(tmp_path, name, **dataset):
  config = default.get_config()
  config.dataset.name = name
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.dataset.num_workers = 2
  for key, value in dataset.items():
    config.dataset[key] = value
  config.train.batch_size = 4
  config.train.seed = 0
  config.eval.batch_size = 4
  return config


def _synthetic_config(tmp_path, **dataset):
  config = _config(tmp_path, 'synthetic_scenes', num_classes=4, synthetic_image_size=29,
                   synthetic_num_train=10, synthetic_num_val=6, train_split='train', **dataset)
  config.train.crop_size = (25, 25)
  config.eval.crop_size = (29, 29)
  return config


@pytest.fixture
def voc_config(tmp_path, shared_data):
  """The VOC builder over a VOCdevkit of real files: train = 12 ids, val = 5 ids."""
  ids = (shared_data / VOC_SUBSET / 'ImageSets/Segmentation/train.txt').read_text().split()
  devkit = tmp_path / 'manual/VOCdevkit/VOC2012'
  (devkit / 'ImageSets/Segmentation').mkdir(parents=True)
  for folder in ('JPEGImages', 'SegmentationClass'):
    os.symlink(shared_data / VOC_SUBSET / folder, devkit / folder)
  (devkit / 'ImageSets/Segmentation/train.txt').write_text('\n'.join(ids[:12]))
  (devkit / 'ImageSets/Segmentation/val.txt').write_text('\n'.join(ids[12:17]))
  config = _config(tmp_path, 'voc2012_segmentation', manual_dir=str(tmp_path / 'manual'),
                   builder_config='voc_only', train_split='train', eval_split='val')
  config.train.crop_size = (193, 193)
  config.train.batch_size = 6
  return config


def _edge_ratio(images, labels):
  """Mean image gradient on void-border pixels over the mean everywhere, padding excluded.

  VOC's 255 borders trace object outlines, where photographs have strong edges: aligned pairs give a
  ratio well above 1, misaligned ones about 1.
  """
  grey = images.mean(-1)
  grad = np.abs(grey[:, 1:, 1:] - grey[:, :-1, 1:]) + np.abs(grey[:, 1:, 1:] - grey[:, 1:, :-1])
  padding = (labels == 255) & np.all(images == 127.5, axis=-1)
  valid = ~(padding[:, 1:, 1:] | padding[:, :-1, 1:] | padding[:, 1:, :-1])
  border = valid & (labels[:, 1:, 1:] == 255)
  return grad[border].mean() / grad[valid].mean()


def test_train_iterator_on_real_voc(voc_config):
  batches = ip.create_train_iterator(voc_config, ip.load_dataset(voc_config))
  images, labels = [], []
  for _ in range(6):
    batch = next(batches)
    assert batch['image'].shape == (6, 193, 193, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (6, 193, 193) and batch['label'].dtype == np.int32
    images.append(batch['image'])
    labels.append(batch['label'])
  images, labels = np.concatenate(images), np.concatenate(labels)
  assert set(np.unique(labels)) <= set(range(21)) | {255}
  assert len(set(np.unique(labels)) - {0, 255}) >= 3
  assert 0 <= images.min() and images.max() <= 255
  aligned = _edge_ratio(images, labels)
  misaligned = _edge_ratio(images, labels[:, :, ::-1])
  assert aligned > 1.3 and aligned > misaligned + 0.25, (aligned, misaligned)


def test_train_iterator_keeps_colour_coded_real_masks_aligned(tmp_path, shared_data):
  """Images painted from real VOC masks, through the folder builder and the whole train pipeline."""
  ids = (shared_data / VOC_SUBSET / 'ImageSets/Segmentation/train.txt').read_text().split()[:8]
  root = tmp_path / 'coded'
  for sub in ('train/images', 'train/masks'):
    (root / sub).mkdir(parents=True)
  for image_id in ids:
    mask = Image.open(shared_data / VOC_SUBSET / 'SegmentationClass' / f'{image_id}.png')
    mask.save(root / 'train/masks' / f'{image_id}.png')
    indices = np.array(mask)
    Image.fromarray(PALETTE[np.minimum(indices, 20)]).save(root / 'train/images' / f'{image_id}.png')
  config = _config(tmp_path, 'folder', manual_dir=str(root), num_classes=21, train_split='train',
                   eval_split='train')
  config.train.crop_size = (161, 161)
  batches = ip.create_train_iterator(config, ip.load_dataset(config))
  for _ in range(4):
    batch = next(batches)
    for image, label in zip(batch['image'], batch['label']):
      _assert_colour_coded(image, label, max_mismatch=5e-4)


def test_train_iterator_is_resumable_deterministic_and_host_sharded(tmp_path):
  config = _synthetic_config(tmp_path)
  dataset = ip.load_dataset(config)
  first = ip.create_train_iterator(config, dataset)
  run = [next(first) for _ in range(6)]
  resumed = ip.create_train_iterator(config, dataset, start_step=4)
  for step in (4, 5):
    batch = next(resumed)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(batch[key], run[step][key])
  assert not np.array_equal(run[0]['image'], run[1]['image'])
  # Two hosts read disjoint halves of the same global batches.
  hosts = [ip.create_train_iterator(config, dataset, start_step=3, process_index=p, process_count=2)
           for p in (0, 1)]
  halves = [next(h) for h in hosts]
  assert halves[0]['image'].shape[0] == 2
  np.testing.assert_array_equal(np.concatenate([h['label'] for h in halves]), run[3]['label'])
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), run[3]['image'])
  # Threads change nothing; the seed changes everything.
  config.dataset.num_workers = 0
  np.testing.assert_array_equal(next(ip.create_train_iterator(config, dataset, start_step=2))['image'],
                                run[2]['image'])
  config.train.seed = 1
  assert not np.array_equal(next(ip.create_train_iterator(config, dataset))['image'], run[0]['image'])
  with pytest.raises(ValueError, match='config.train.batch_size=4 must be divisible'):
    ip.create_train_iterator(config, dataset, process_index=0, process_count=3)


def test_train_example_index_visits_each_example_once_per_epoch():
  first = [ip.train_example_index(s, 7, seed=3) for s in range(7)]
  second = [ip.train_example_index(s, 7, seed=3) for s in range(7, 14)]
  assert sorted(first) == sorted(second) == list(range(7))
  assert first != second
  assert first == [ip.train_example_index(s, 7, seed=3) for s in range(7)]
  assert first != [ip.train_example_index(s, 7, seed=4) for s in range(7)]


def _write_sized_folder(root, sizes):
  for sub in ('val/images', 'val/masks'):
    (root / sub).mkdir(parents=True)
  for i, (h, w) in enumerate(sizes):
    Image.fromarray(np.full((h, w, 3), 10 * (i + 1), np.uint8)).save(root / 'val/images' / f'im{i}.png')
    Image.fromarray(np.full((h, w), i % 3, np.uint8), mode='L').save(root / 'val/masks' / f'im{i}.png')


def test_eval_iterator_pads_to_the_crop_and_masks_padding_examples(tmp_path):
  sizes = [(5, 7), (8, 3), (6, 6), (2, 8), (7, 7)]
  _write_sized_folder(tmp_path / 'data', sizes)
  config = _config(tmp_path, 'folder', manual_dir=str(tmp_path / 'data'), num_classes=3, train_split='val',
                   eval_split='val')
  config.eval.crop_size = (8, 8)
  dataset = ip.load_dataset(config)
  assert dataset.info.num_eval_examples == 5
  batches = list(ip.create_eval_iterator(config, dataset))
  assert len(batches) == 2  # ceil(5 / 4).
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  masks = np.concatenate([b['mask'] for b in batches])
  assert images.shape == (8, 8, 8, 3) and labels.shape == (8, 8, 8) and labels.dtype == np.int32
  np.testing.assert_array_equal(masks, [True] * 5 + [False] * 3)
  seen = []
  for row in range(5):  # TFDS stores examples in a fixed order hashed from their keys; each image is
    i = int(images[row, 0, 0, 0]) // 10 - 1  # filled with 10 * (i + 1), which says which one it is.
    h, w = sizes[i]
    seen.append(i)
    assert np.all(images[row, :h, :w] == 10 * (i + 1)) and np.all(labels[row, :h, :w] == i % 3)
    outside = np.ones((8, 8), bool)
    outside[:h, :w] = False
    assert np.all(labels[row][outside] == 255) and np.all(images[row][outside] == 127.5)
  assert sorted(seen) == list(range(5))
  assert np.all(labels[5:] == 255)
  # Two hosts: same number of batches, rows split in order.
  host1 = list(ip.create_eval_iterator(config, dataset, process_index=1, process_count=2))
  assert len(host1) == 2
  np.testing.assert_array_equal(host1[0]['label'], labels[2:4])
  np.testing.assert_array_equal(host1[1]['mask'], [False, False])
  config.eval.num_images = 3
  assert ip.load_dataset(config).info.num_eval_examples == 3
  assert np.concatenate([b['mask'] for b in ip.create_eval_iterator(config, ip.load_dataset(config))]).sum() == 3
  config.eval.crop_size = (7, 7)
  config.eval.num_images = -1
  with pytest.raises(ValueError, match='im1 is 8x3.*raise config.eval.crop_size to at least 8x7'):
    list(ip.create_eval_iterator(config, ip.load_dataset(config)))


def test_load_dataset_and_config_checks(tmp_path):
  config = _synthetic_config(tmp_path)
  info = ip.load_dataset(config).info
  assert info.num_classes == 4 and info.class_names[0] == 'background' and info.ignore_label == 255
  assert info.num_train_examples == 10 and info.num_eval_examples == 6
  config.dataset.class_names = ('bg', 'a', 'b', 'c')
  assert ip.load_dataset(config).info.class_names == ('bg', 'a', 'b', 'c')
  config.dataset.ignore_label = 0
  with pytest.raises(ValueError, match='config.dataset.ignore_label'):
    ip.load_dataset(config).info
  config.dataset.ignore_label = 255
  config.dataset.eval_split = 'test'
  with pytest.raises(ValueError, match=r"'test'.*available: \['train', 'val'\]"):
    ip.load_dataset(config).info.num_eval_examples
