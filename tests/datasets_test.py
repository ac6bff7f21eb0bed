"""Tests for deeplab_jax.datasets: builders on real VOC files and SBD/Cityscapes/ADE20K/folder fixtures."""
import io
import os
import pathlib
import tarfile
import zipfile

import ml_collections
import numpy as np
from PIL import Image
import pytest
import scipy.io

from configs import default
from deeplab_jax import datasets
from deeplab_jax.datasets import ade20k
from deeplab_jax.datasets import cityscapes
from deeplab_jax.datasets import common
from deeplab_jax.datasets import synthetic
from deeplab_jax.datasets import voc

VOC_SUBSET = 'voc2012_train_subset'


def _voc_ids(shared_data):
  return (shared_data / VOC_SUBSET / 'ImageSets/Segmentation/train.txt').read_text().split()


def _voc_mask(shared_data, image_id):
  return np.array(Image.open(shared_data / VOC_SUBSET / 'SegmentationClass' / f'{image_id}.png'))


def _write_sbd_mat(path, mask):
  """An SBD-format cls/<id>.mat: struct GTcls with Segmentation (uint8), as SBD's benchmark.tgz has."""
  scipy.io.savemat(path, {'GTcls': {'Segmentation': mask.astype(np.uint8), 'Boundaries': np.zeros((1, 1)),
                                    'CategoriesPresent': np.unique(mask).astype(np.uint8)}})


@pytest.fixture
def voc_layout(tmp_path, shared_data):
  """A VOCdevkit over the real subset (symlinked), small train/val lists, and SBD .mat fixtures.

  Lists: VOC train = ids[0:12], VOC val = ids[12:18]; SBD train = ids[18:24] + ids[3], SBD val = ids[14:18].
  train_aug = (VOC train | SBD) - VOC val = ids[0:12] + ids[18:24] (18 ids).
  """
  ids = _voc_ids(shared_data)
  manual = tmp_path / 'manual'
  devkit = manual / 'VOCdevkit/VOC2012'
  (devkit / 'ImageSets/Segmentation').mkdir(parents=True)
  for folder_name in ('JPEGImages', 'SegmentationClass'):
    os.symlink(shared_data / VOC_SUBSET / folder_name, devkit / folder_name)
  (devkit / 'ImageSets/Segmentation/train.txt').write_text('\n'.join(ids[:12]) + '\n')
  (devkit / 'ImageSets/Segmentation/val.txt').write_text('\n'.join(ids[12:18]) + '\n')
  sbd = manual / 'benchmark_RELEASE/dataset'
  (sbd / 'cls').mkdir(parents=True)
  for image_id in ids[14:24]:
    mask = _voc_mask(shared_data, image_id)
    _write_sbd_mat(sbd / 'cls' / f'{image_id}.mat', np.where(mask == 255, 0, mask))  # SBD has no void borders.
  # ids[3] is in VOC train and in SBD with a different (all-background) label: VOC's own mask must win.
  _write_sbd_mat(sbd / 'cls' / f'{ids[3]}.mat', np.zeros_like(_voc_mask(shared_data, ids[3])))
  (sbd / 'train.txt').write_text('\n'.join(ids[18:24] + ids[3:4]) + '\n')
  (sbd / 'val.txt').write_text('\n'.join(ids[14:18]) + '\n')
  return manual, ids


def _dataset_config(name, tmp_path, **overrides):
  config = default.get_config().dataset
  config.name = name
  config.data_dir = str(tmp_path / 'tfds')
  for key, value in overrides.items():
    config[key] = value
  return config


def test_voc_builder_on_real_files(voc_layout, tmp_path, shared_data):
  manual, ids = voc_layout
  builder = datasets.get_builder(_dataset_config('voc2012_segmentation', tmp_path, manual_dir=str(manual)))
  builder.download_and_prepare()
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  assert counts == {'train': 12, 'val': 6, 'trainval': 18, 'train_aug': 18}
  assert builder.class_names == voc.CLASS_NAMES and len(builder.class_names) == 21

  train_aug = builder.as_data_source('train_aug')
  got_ids = sorted(train_aug[i]['image_id'].decode() for i in range(len(train_aug)))
  assert got_ids == sorted(ids[:12] + ids[18:24])
  for i in range(len(train_aug)):
    example = train_aug[i]
    image_id = example['image_id'].decode()
    label = example['label'][..., 0]
    assert set(np.unique(label)) <= set(range(21)) | {255}
    jpeg = Image.open(shared_data / VOC_SUBSET / 'JPEGImages' / f'{image_id}.jpg')
    np.testing.assert_array_equal(example['image'], np.array(jpeg))
    expected = _voc_mask(shared_data, image_id)
    if image_id in ids[18:24]:
      expected = np.where(expected == 255, 0, expected)  # From the SBD .mat fixture.
    np.testing.assert_array_equal(label, expected)
  # VOC's palette masks carry class indices (not grey levels): a real mask has 255 borders and classes.
  voc_example = next(train_aug[i] for i in range(len(train_aug)) if train_aug[i]['image_id'].decode() == ids[3])
  assert 255 in voc_example['label'] and voc_example['label'].max() == 255
  assert set(np.unique(voc_example['label'])) - {0, 255}


def test_voc_builder_from_archives(tmp_path, shared_data):
  """The published archive names are read directly: an uncompressed .tar and a gzipped .tgz."""
  ids = _voc_ids(shared_data)[:6]
  manual = tmp_path / 'manual'
  manual.mkdir()
  with tarfile.open(manual / voc.VOC_ARCHIVE, 'w') as tar:
    for image_id in ids:
      tar.add(shared_data / VOC_SUBSET / 'JPEGImages' / f'{image_id}.jpg',
              f'VOCdevkit/VOC2012/JPEGImages/{image_id}.jpg')
      tar.add(shared_data / VOC_SUBSET / 'SegmentationClass' / f'{image_id}.png',
              f'VOCdevkit/VOC2012/SegmentationClass/{image_id}.png')
    for split, split_ids in (('train', ids[:4]), ('val', ids[4:])):
      data = ('\n'.join(split_ids) + '\n').encode()
      info = tarfile.TarInfo(f'VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  sbd_dir = tmp_path / 'sbd' / 'benchmark_RELEASE/dataset'
  (sbd_dir / 'cls').mkdir(parents=True)
  _write_sbd_mat(sbd_dir / 'cls' / f'{ids[5]}.mat', np.zeros_like(_voc_mask(shared_data, ids[5])))
  (sbd_dir / 'train.txt').write_text(ids[5] + '\n')
  (sbd_dir / 'val.txt').write_text('')
  with tarfile.open(manual / voc.SBD_ARCHIVE, 'w:gz') as tgz:
    tgz.add(tmp_path / 'sbd' / 'benchmark_RELEASE', 'benchmark_RELEASE')
  builder = datasets.get_builder(_dataset_config('voc2012_segmentation', tmp_path, manual_dir=str(manual)))
  builder.download_and_prepare()
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  assert counts == {'train': 4, 'val': 2, 'trainval': 6, 'train_aug': 4}  # ids[5] is a VOC val image.


def test_voc_missing_downloads_name_files_and_urls(tmp_path):
  manual = tmp_path / 'empty'
  manual.mkdir()
  builder = datasets.get_builder(_dataset_config('voc2012_segmentation', tmp_path, manual_dir=str(manual)))
  with pytest.raises(datasets.ManualDownloadError) as error:
    builder.download_and_prepare()
  message = str(error.value)
  for expected in (f'{manual}/VOCtrainval_11-May-2012.tar', f'{manual}/VOCdevkit/VOC2012/', voc.VOC_URL,
                   f'{manual}/benchmark.tgz', f'{manual}/benchmark_RELEASE/dataset/', voc.SBD_URL, 'voc_only'):
    assert expected in message
  voc_only = datasets.get_builder(_dataset_config('voc2012_segmentation', tmp_path, manual_dir=str(manual),
                                                  builder_config='voc_only'))
  with pytest.raises(datasets.ManualDownloadError) as error:
    voc_only.download_and_prepare()
  assert voc.VOC_URL in str(error.value) and 'benchmark.tgz' not in str(error.value)


def test_voc_incomplete_download_names_missing_files(voc_layout, tmp_path):
  manual, ids = voc_layout
  sbd_mat = manual / 'benchmark_RELEASE/dataset/cls' / f'{ids[20]}.mat'
  sbd_mat.unlink()
  builder = datasets.get_builder(_dataset_config('voc2012_segmentation', tmp_path, manual_dir=str(manual)))
  with pytest.raises(datasets.ManualDownloadError) as error:
    builder.download_and_prepare()
  assert f'cls/{ids[20]}.mat' in str(error.value) and voc.SBD_URL in str(error.value)


def test_read_sbd_mat_and_palette_masks(tmp_path):
  mask = np.array([[0, 1], [15, 20]], np.uint8)
  _write_sbd_mat(tmp_path / 'x.mat', mask)
  np.testing.assert_array_equal(voc.read_sbd_mat((tmp_path / 'x.mat').read_bytes(), 'x.mat'), mask)
  # A palette PNG whose class 1 is drawn in VOC's dark red: indices, not the grey level of that colour.
  palette_image = Image.fromarray(np.array([[0, 1], [255, 1]], np.uint8), mode='P')
  palette_image.putpalette([0, 0, 0, 128, 0, 0] + [224, 224, 192] * 254)
  buffer = io.BytesIO()
  palette_image.save(buffer, format='PNG')
  np.testing.assert_array_equal(common.decode_mask(buffer.getvalue(), 'm.png'), [[0, 1], [255, 1]])
  assert np.array(Image.open(io.BytesIO(buffer.getvalue())).convert('L'))[0, 1] == 38  # What 'L' would give.
  rgb = io.BytesIO()
  Image.new('RGB', (2, 2)).save(rgb, format='PNG')
  with pytest.raises(ValueError, match='class indices'):
    common.decode_mask(rgb.getvalue(), 'rgb.png')


def test_cityscapes_train_id_mapping():
  label_ids = np.arange(40, dtype=np.uint8).reshape(5, 8)
  train_ids = cityscapes.label_ids_to_train_ids(label_ids).ravel()
  expected = np.full(40, 255)
  for label_id, train_id in {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}.items():
    expected[label_id] = train_id
  np.testing.assert_array_equal(train_ids, expected)
  assert len(cityscapes.CLASS_NAMES) == 19


def _png_bytes(array, mode):
  buffer = io.BytesIO()
  Image.fromarray(array, mode=mode).save(buffer, format='PNG')
  return buffer.getvalue()


class _TinyCityscapes(cityscapes.Cityscapes, skip_registration=True):
  SPLIT_SIZES = {'train': 2, 'val': 1}


def test_cityscapes_builder_from_zips(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  stems = ['train/aachen/aachen_000000_000019', 'train/aachen/aachen_000001_000019', 'val/lindau/lindau_000000_000019']
  label_ids = np.array([[7, 26, 0], [33, 24, 1]], np.uint8)
  with zipfile.ZipFile(manual / cityscapes.IMAGE_ARCHIVE, 'w') as images, \
       zipfile.ZipFile(manual / cityscapes.LABEL_ARCHIVE, 'w') as labels:
    for stem in stems:
      images.writestr(f'leftImg8bit/{stem}_leftImg8bit.png', _png_bytes(np.full((2, 3, 3), 9, np.uint8), 'RGB'))
      labels.writestr(f'gtFine/{stem}_gtFine_labelIds.png', _png_bytes(label_ids, 'L'))
  builder = _TinyCityscapes(data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual))
  builder.download_and_prepare()
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {'train': 2, 'val': 1}
  np.testing.assert_array_equal(builder.as_data_source('val')[0]['label'][..., 0], [[0, 13, 255], [18, 11, 255]])

  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(datasets.ManualDownloadError) as error:
    datasets.get_builder(_dataset_config('cityscapes', tmp_path, manual_dir=str(empty))).download_and_prepare()
  for expected in (f'{empty}/gtFine_trainvaltest.zip', f'{empty}/leftImg8bit_trainvaltest.zip', cityscapes.URL):
    assert expected in str(error.value)
  # The real builder wants the published split sizes: two train images are an incomplete download.
  with pytest.raises(datasets.ManualDownloadError, match='expected 2975'):
    datasets.get_builder(_dataset_config('cityscapes', tmp_path, manual_dir=str(manual))).download_and_prepare()


class _TinyAde20k(ade20k.Ade20k, skip_registration=True):
  SPLIT_SIZES = {'train': 2, 'val': 1}


def test_ade20k_builder_keeps_official_labels_and_converts_grey_images(tmp_path):
  assert len(ade20k.CLASS_NAMES) == 151 and ade20k.CLASS_NAMES[:2] == ('other', 'wall')
  manual = tmp_path / 'manual'
  manual.mkdir()
  annotation = np.array([[0, 1, 150]], np.uint8)
  with zipfile.ZipFile(manual / ade20k.ARCHIVE, 'w') as archive:
    for folder_name, stem in (('training', 'ADE_train_00000001'), ('training', 'ADE_train_00000002'),
                              ('validation', 'ADE_val_00000001')):
      buffer = io.BytesIO()
      Image.fromarray(np.full((1, 3), 77, np.uint8), mode='L').save(buffer, format='JPEG')  # A grey JPEG.
      archive.writestr(f'ADEChallengeData2016/images/{folder_name}/{stem}.jpg', buffer.getvalue())
      archive.writestr(f'ADEChallengeData2016/annotations/{folder_name}/{stem}.png', _png_bytes(annotation, 'L'))
  builder = _TinyAde20k(data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual))
  builder.download_and_prepare()
  example = builder.as_data_source('val')[0]
  assert example['image'].shape == (1, 3, 3)
  np.testing.assert_array_equal(example['label'][..., 0], [[0, 1, 150]])
  assert builder.info.metadata['ignore_label'] == 0
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(datasets.ManualDownloadError) as error:
    datasets.get_builder(_dataset_config('ade20k', tmp_path, manual_dir=str(empty))).download_and_prepare()
  assert f'{empty}/ADEChallengeData2016.zip' in str(error.value) and ade20k.URL in str(error.value)


def _write_folder_dataset(root: pathlib.Path, num_classes=3):
  rng = np.random.default_rng(0)
  for split, count in (('train', 3), ('val', 2)):
    (root / split / 'images').mkdir(parents=True)
    (root / split / 'masks').mkdir(parents=True)
    for i in range(count):
      image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
      mask = rng.integers(0, num_classes, (6, 5), dtype=np.uint8)
      mask[0, 0] = 255
      Image.fromarray(image).save(root / split / 'images' / f'img{i}.png')
      palette_mask = Image.fromarray(mask, mode='P')
      palette_mask.putpalette(list(range(256)) * 3)
      palette_mask.save(root / split / 'masks' / f'img{i}.png')


def test_folder_builder(tmp_path):
  root = tmp_path / 'mydata'
  _write_folder_dataset(root)
  config = _dataset_config('folder', tmp_path, manual_dir=str(root), num_classes=3, class_names=('a', 'b', 'c'))
  builder = datasets.get_builder(config)
  builder.download_and_prepare()
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {'train': 3, 'val': 2}
  assert builder.class_names == ('a', 'b', 'c')
  example = builder.as_data_source('val')[0]
  name = example['image_id'].decode()
  np.testing.assert_array_equal(example['image'], np.array(Image.open(root / 'val/images' / f'{name}.png')))
  np.testing.assert_array_equal(example['label'][..., 0], np.array(Image.open(root / 'val/masks' / f'{name}.png')))
  # Editing the folder gives a new fingerprint, hence a fresh build instead of stale files.
  (root / 'val/images/img1.png').unlink()
  (root / 'val/masks/img1.png').unlink()
  rebuilt = datasets.get_builder(config)
  assert rebuilt.builder_config.name != builder.builder_config.name
  rebuilt.download_and_prepare()
  assert rebuilt.info.splits['val'].num_examples == 1


def test_folder_builder_errors(tmp_path):
  root = tmp_path / 'mydata'
  _write_folder_dataset(root, num_classes=3)
  with pytest.raises(ValueError, match='outside the class ids 0..1'):
    datasets.get_builder(_dataset_config('folder', tmp_path, manual_dir=str(root), num_classes=2)
                         ).download_and_prepare()
  (root / 'train/masks/img2.png').unlink()
  with pytest.raises(datasets.ManualDownloadError, match='img2.png'):
    datasets.get_builder(_dataset_config('folder', tmp_path, manual_dir=str(root), num_classes=3)
                         ).download_and_prepare()
  with pytest.raises(datasets.ManualDownloadError, match='images'):
    datasets.get_builder(_dataset_config('folder', tmp_path, manual_dir=str(tmp_path / 'nowhere'), num_classes=3))


def test_synthetic_scenes_are_deterministic_varied_and_exact():
  image, mask = synthetic.generate_scene(7, 'train', image_size=65, num_classes=5, seed=3)
  again, again_mask = synthetic.generate_scene(7, 'train', image_size=65, num_classes=5, seed=3)
  np.testing.assert_array_equal(image, again)
  np.testing.assert_array_equal(mask, again_mask)
  assert image.shape == (65, 65, 3) and image.dtype == np.uint8 and mask.shape == (65, 65)
  val_image, _ = synthetic.generate_scene(7, 'val', image_size=65, num_classes=5, seed=3)
  assert not np.array_equal(image, val_image)  # Held-out scenes: val is another stream.

  scenes = [synthetic.generate_scene(i, 'train', image_size=65, num_classes=5) for i in range(40)]
  masks = np.stack([m for _, m in scenes])
  images = np.stack([im for im, _ in scenes]).astype(np.float32)
  assert set(np.unique(masks)) == {0, 1, 2, 3, 4}
  assert max(len(np.unique(m)) for m in masks) >= 4  # Several objects (and classes) per scene.
  assert all(len(np.unique(m)) >= 2 for m in masks)
  # Textured: objects and backgrounds are not flat colours.
  assert np.mean([images[i][masks[i] == 0].std(axis=0).mean() for i in range(40)]) > 5
  # Exact masks: object classes have saturated colours and the background does not, pixel by pixel.
  saturation = (images.max(-1) - images.min(-1)) / np.maximum(images.max(-1), 1)
  assert np.median(saturation[masks == 0]) < 0.3 < np.median(saturation[masks > 0])
  # Class identity lives in a hue band: the classes' circular mean hues are far apart.
  hues = np.stack([np.array(Image.fromarray(im).convert('HSV'))[..., 0] for im, _ in scenes]) / 256 * 2 * np.pi
  mean_hue = [np.angle(np.exp(1j * hues[masks == c]).mean()) for c in range(1, 5)]
  gaps = [abs(np.angle(np.exp(1j * (a - b)))) for i, a in enumerate(mean_hue) for b in mean_hue[i + 1:]]
  assert min(gaps) > 0.25 * np.pi
  with pytest.raises(ValueError, match='num_classes'):
    synthetic.generate_scene(0, image_size=9, num_classes=1)


def test_synthetic_builder_and_config_name(tmp_path):
  config = _dataset_config('synthetic_scenes', tmp_path, num_classes=4, synthetic_image_size=33,
                           synthetic_num_train=6, synthetic_num_val=3)
  builder = datasets.get_builder(config)
  builder.download_and_prepare()
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {'train': 6, 'val': 3}
  assert builder.class_names[0] == 'background' and len(builder.class_names) == 4
  examples = {e['image_id'].decode(): e for e in (builder.as_data_source('val')[i] for i in range(3))}
  image, mask = synthetic.generate_scene(2, 'val', image_size=33, num_classes=4)
  np.testing.assert_array_equal(examples['val_000002']['image'], image)  # PNG storage is lossless.
  np.testing.assert_array_equal(examples['val_000002']['label'][..., 0], mask)
  config.synthetic_seed = 1
  assert datasets.get_builder(config).builder_config.name != builder.builder_config.name


def test_get_builder_rejects_unknown_names_and_fields(tmp_path):
  with pytest.raises(ValueError) as error:
    datasets.get_builder(ml_collections.ConfigDict({'name': 'coco', 'data_dir': '', 'manual_dir': ''}))
  for name in datasets.DATASET_NAMES:
    assert name in str(error.value)
  with pytest.raises(ValueError, match="'with_sbd', 'voc_only'"):
    datasets.get_builder(_dataset_config('voc2012_segmentation', tmp_path, builder_config='aug'))
  with pytest.raises(ValueError, match='num_classes'):
    datasets.get_builder(_dataset_config('synthetic_scenes', tmp_path, num_classes=40))


def test_synthetic_builder_with_the_default_settings(tmp_path):
  # The default settings equal the predefined builder config, which TFDS must get by name.
  from configs import tiny
  config = tiny.get_config()
  config.dataset.data_dir = str(tmp_path)
  config.dataset.synthetic_num_train = 1000
  builder = datasets.get_builder(config.dataset)
  assert builder.builder_config.name == synthetic.make_config(97, 5, 1000, 200, 0, 5).name
