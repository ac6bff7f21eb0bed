"""Tests for deeplab_jax.predict: eval-exact predictions, image decoding, buckets, outputs, the CLI."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import tiny
import tiny_run
from deeplab_jax import checkpoint
from deeplab_jax import evaluate
from deeplab_jax import input_pipeline
from deeplab_jax import metrics
from deeplab_jax import predict
from deeplab_jax import train
from deeplab_jax import visualize
from deeplab_jax.models import create_model

REPO = pathlib.Path(__file__).resolve().parents[1]
VOC_IDS = ('2007_002273', '2007_008043', '2007_001724')  # three small real images (<= 320 px)


def tiny_voc_config(crop=65, num_classes=21):
  config = tiny.get_config()
  config.model.num_classes = num_classes
  config.dataset.name = 'voc2012_segmentation'
  config.dataset.num_classes = num_classes
  config.eval.crop_size = (crop, crop)
  return config


def save_checkpoint(workdir, config, variables, step=3):
  ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
  ckpt.save(step, variables, {'step': np.int32(step), 'opt_state': {}}, config)
  ckpt.close()
  return str(workdir)


@pytest.fixture(scope='module')
def tiny_voc(tmp_path_factory):
  """(config, variables, workdir) of a tiny 21-class VOC model, crop 65."""
  config = tiny_voc_config()
  variables = tiny_run.random_variables(config)
  workdir = save_checkpoint(tmp_path_factory.mktemp('tiny_voc'), config, variables)
  return config, variables, workdir


def _random_image(height, width, seed):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Image reading.
# ----------------------------------------------------------------------------------------------------


def test_load_image_converts_modes_and_applies_exif_orientation(tmp_path):
  rgb = _random_image(20, 40, 0)
  rgb[:5, :5] = (255, 0, 0)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  Image.fromarray(rgb).save(tmp_path / 'rotated.png', exif=exif)
  upright = predict.load_image(str(tmp_path / 'rotated.png'))
  assert upright.shape == (40, 20, 3)
  np.testing.assert_array_equal(upright, np.rot90(rgb, k=-1))
  np.testing.assert_array_equal(upright[0, -1], (255, 0, 0))  # the stored top-left is now top-right

  grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  Image.fromarray(grey).save(tmp_path / 'grey.png')
  np.testing.assert_array_equal(predict.load_image(str(tmp_path / 'grey.png')), np.stack([grey] * 3, -1))

  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (10, 20, 30, 255)  # opaque
  rgba[0, 1] = (10, 20, 30, 0)  # fully transparent: white, as a viewer shows it
  rgba[1, :] = (200, 100, 0, 128)
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'alpha.png')
  image = predict.load_image(str(tmp_path / 'alpha.png'))
  np.testing.assert_array_equal(image[0, 0], (10, 20, 30))
  np.testing.assert_array_equal(image[0, 1], (255, 255, 255))
  np.testing.assert_allclose(image[1, 0], (228, 178, 127), atol=1)

  Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=100)
  image = predict.load_image(str(tmp_path / 'cmyk.jpg'))
  assert image.shape == (20, 40, 3) and image.dtype == np.uint8
  assert np.abs(image.astype(int) - rgb).mean() < 8

  Image.fromarray((grey.astype(np.uint16) * 257)).save(tmp_path / 'grey16.png')
  np.testing.assert_array_equal(predict.load_image(str(tmp_path / 'grey16.png'))[..., 0], grey)

  palette = Image.fromarray(grey).convert('P')
  palette.save(tmp_path / 'palette.gif')
  np.testing.assert_array_equal(predict.load_image(str(tmp_path / 'palette.gif'))[..., 1], grey)


def test_unreadable_files_raise_naming_the_file(tmp_path):
  (tmp_path / 'notes.jpg').write_text('not an image')
  with pytest.raises(predict.ImageReadError, match=r'notes\.jpg: not a readable image'):
    predict.load_image(str(tmp_path / 'notes.jpg'))
  Image.fromarray(_random_image(64, 64, 1)).save(tmp_path / 'full.jpg')
  data = (tmp_path / 'full.jpg').read_bytes()
  (tmp_path / 'truncated.jpg').write_bytes(data[:len(data) // 3])
  with pytest.raises(predict.ImageReadError, match=r'truncated\.jpg'):
    predict.load_image(str(tmp_path / 'truncated.jpg'))
  (tmp_path / 'empty.png').write_bytes(b'')
  with pytest.raises(predict.ImageReadError, match=r'empty\.png'):
    predict.load_image(str(tmp_path / 'empty.png'))


def test_find_images_and_output_names(tmp_path):
  for name in ('b.jpg', 'a.png', 'a.jpg', 'README.txt'):
    (tmp_path / name).write_bytes(b'x')
  found = predict.find_images(str(tmp_path))
  assert [os.path.basename(p) for p in found] == ['a.jpg', 'a.png', 'b.jpg']  # README.txt left out
  assert predict.find_images(str(tmp_path / '*.txt')) == [str(tmp_path / 'README.txt')]  # a glob takes all
  assert predict.output_names(found) == ['a_jpg', 'a_png', 'b']
  assert predict.output_names(['x/a.jpg', 'y/a.jpg', 'z/c.png']) == ['a_jpg', 'a_jpg_2', 'c']
  with pytest.raises(FileNotFoundError, match='nothing_here'):
    predict.find_images(str(tmp_path / 'nothing_here*'))


# ----------------------------------------------------------------------------------------------------
# Shapes and resizing.
# ----------------------------------------------------------------------------------------------------


def test_plans_and_buckets():
  assert [predict.grow_to_bucket(s, 513) for s in (1, 513, 514, 1025, 1026, 2000)] == [513, 513, 1025, 1025,
                                                                                    1537, 2049]
  fits = predict.plan(375, 500, (513, 513))
  assert fits == predict.Plan((375, 500), (375, 500), (513, 513)) and not fits.resized
  big = predict.plan(1500, 2000, (513, 513))  # long side to the crop, aspect kept
  assert big == predict.Plan((1500, 2000), (385, 513), (513, 513)) and big.resized
  assert predict.plan(1500, 2000, (513, 513), 'pad') == predict.Plan((1500, 2000), (1500, 2000), (1537, 2049))
  assert predict.plan(600, 100, (513, 513)).model_size == (513, 86)
  with pytest.raises(ValueError, match="large_images='crop' is not one of"):
    predict.plan(10, 10, (513, 513), 'crop')


def test_resize_probabilities_is_half_pixel_bilinear():
  column = np.array([0.0, 1.0], np.float32).reshape(2, 1, 1)
  np.testing.assert_allclose(predict.resize_probabilities(column, (4, 1))[:, 0, 0], [0, 0.25, 0.75, 1])
  x = np.random.default_rng(0).random((7, 5, 3)).astype(np.float32)
  expected = jax.image.resize(x, (16, 13, 3), 'linear', antialias=False)
  np.testing.assert_allclose(predict.resize_probabilities(x, (16, 13)), expected, atol=1e-6)
  labels = predict._labels_at(x, (16, 13), chunk_rows=5)
  np.testing.assert_array_equal(labels, np.argmax(expected, -1))


# ----------------------------------------------------------------------------------------------------
# Predictions equal eval's.
# ----------------------------------------------------------------------------------------------------


def test_predictor_equals_eval_step_and_api_shapes(tiny_voc):
  config, variables, _ = tiny_voc
  predictor = predict.Predictor(config, variables, batch_size=2)
  images = [_random_image(h, w, seed) for seed, (h, w) in enumerate([(65, 65), (40, 60), (13, 7)])]
  labels, probabilities = predictor(images, return_probabilities=True)
  assert predictor.num_compiles == 1
  model = create_model(config.model, output_stride=config.eval.output_stride)
  padded = [input_pipeline.pad_for_eval(im, np.zeros(im.shape[:2], np.uint8), (65, 65), (127.5,) * 3, 255)
            for im in images]
  batch = {'image': np.stack([p[0] for p in padded]), 'label': np.stack([p[1] for p in padded]),
           'mask': np.ones(3, bool)}
  step = jax.jit(lambda v, b: evaluate.eval_step(v, b, model=model, num_classes=21, scales=(1.0,),
                                                 flip=False))
  _, eval_predictions = step(variables, batch)
  for image, label, probability, expected in zip(images, labels, probabilities, np.asarray(eval_predictions)):
    height, width = image.shape[:2]
    assert label.shape == (height, width) and label.dtype == np.int32
    assert probability.shape == (height, width, 21)
    np.testing.assert_array_equal(label, expected[:height, :width])
    np.testing.assert_array_equal(label, np.argmax(probability, -1))
    np.testing.assert_allclose(probability.sum(-1), 1.0, atol=1e-5)
  assert len(np.unique(np.concatenate([l.ravel() for l in labels]))) > 1  # not a constant model

  single = predictor(images[1])
  np.testing.assert_array_equal(single, labels[1])
  stacked = predictor(np.stack([images[1], images[1]]))
  assert stacked.shape == (2, 40, 60)
  np.testing.assert_array_equal(stacked[1], labels[1])
  assert predictor.num_compiles == 1  # same bucket, same batch size: no recompile


def test_multi_scale_flip_and_output_stride_follow_the_checkpoint_config(tiny_voc):
  config, variables, _ = tiny_voc
  config = config.copy_and_resolve_references()
  config.eval.scales, config.eval.flip, config.eval.output_stride = (0.5,), True, 8
  predictor = predict.Predictor(config, variables)
  assert (predictor.output_stride, predictor.scales, predictor.flip) == (8, (0.5,), True)
  image = _random_image(50, 61, 3)
  _, probabilities = predictor(image, return_probabilities=True)
  model = create_model(config.model, output_stride=8)
  padded, _ = input_pipeline.pad_for_eval(image, np.zeros((50, 61), np.uint8), (65, 65), (127.5,) * 3, 255)
  expected = jax.jit(lambda v, x: evaluate.predict_probabilities(model, v, x, (0.5,), True))(
      variables, padded[None])
  np.testing.assert_allclose(probabilities, np.asarray(expected)[0, :50, :61], atol=1e-6)
  overridden = predict.Predictor(config, variables, scales=[1.0], flip=False, output_stride=16)
  assert (overridden.output_stride, overridden.scales, overridden.flip) == (16, (1.0,), False)
  with pytest.raises(ValueError, match=r'output_stride=12 .* is not one of \(8, 16, 32\)'):
    predict.Predictor(config, variables, output_stride=12)
  with pytest.raises(ValueError, match='eval scales'):
    predict.Predictor(config, variables, scales=[0.0])


def _voc_manual_dir(root, shared_data, ids):
  voc = root / 'VOCdevkit' / 'VOC2012'
  for sub in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation'):
    os.makedirs(voc / sub)
  for image_id in ids:
    shutil.copy(shared_data / 'voc2012_train_subset' / 'JPEGImages' / f'{image_id}.jpg', voc / 'JPEGImages')
    shutil.copy(shared_data / 'voc2012_train_subset' / 'SegmentationClass' / f'{image_id}.png',
                voc / 'SegmentationClass')
  for split in ('train', 'val'):
    (voc / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text('\n'.join(ids) + '\n')
  return voc


def miou_of_label_pngs(label_dir, ground_truth_dir, ids, num_classes=21):
  """mIoU (and the confusion matrix) of written label PNGs against VOC ground truth (255 not counted)."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for image_id in ids:
    truth = visualize.read_label_png(os.path.join(ground_truth_dir, f'{image_id}.png')).astype(np.int64)
    predicted = visualize.read_label_png(os.path.join(label_dir, f'{image_id}.png')).astype(np.int64)
    assert predicted.shape == truth.shape
    valid = truth < num_classes
    confusion += np.bincount(truth[valid] * num_classes + predicted[valid],
                             minlength=num_classes ** 2).reshape(num_classes, num_classes)
  return metrics.mean_iou(confusion), confusion


def _predict_then_evaluate(tmp_path, shared_data, config, workdir, ids, batch_size):
  """Label PNGs from `predict_files` and the `--mode=eval` summary of the same images."""
  voc = _voc_manual_dir(tmp_path / 'manual', shared_data, ids)
  predictor = predict.Predictor.from_checkpoint(workdir, batch_size=batch_size)
  summary = predict.predict_files(predictor, [str(voc / 'JPEGImages' / f'{i}.jpg') for i in ids],
                                  str(tmp_path / 'out'), progress=False)
  assert not summary['skipped'] and len(summary['images']) == len(ids)
  miou, confusion = miou_of_label_pngs(tmp_path / 'out' / 'labels', voc / 'SegmentationClass', ids)
  config = config.copy_and_resolve_references()
  d = config.dataset
  d.builder_config, d.train_split, d.eval_split = 'voc_only', 'train', 'val'
  d.manual_dir, d.data_dir, d.num_workers = str(tmp_path / 'manual'), str(tmp_path / 'tfds'), 0
  config.eval.batch_size, config.eval.num_images_to_save = jax.device_count(), 0
  config.init_from = workdir  # evaluated as README's "Importing published weights" does
  eval_summary = evaluate.evaluate(config, str(tmp_path / 'eval_run'), train.create_mesh())
  return miou, confusion, eval_summary, predictor


def test_label_pngs_give_evals_miou_on_real_voc_images(tmp_path, shared_data):
  config = tiny_voc_config(crop=321)  # the three images are at most 320 px: eval pads them to 321
  variables = tiny_run.random_variables(config, seed=1)
  workdir = save_checkpoint(tmp_path / 'run', config, variables)
  miou, confusion, eval_summary, predictor = _predict_then_evaluate(tmp_path, shared_data, config, workdir,
                                                                    VOC_IDS, batch_size=1)
  np.testing.assert_array_equal(confusion, np.asarray(eval_summary['confusion']))
  assert miou == pytest.approx(eval_summary['miou'], abs=1e-12)
  assert eval_summary['num_images'] == 3 and predictor.num_compiles == 1
  assert np.count_nonzero(confusion.sum(0)) > 1  # the model predicts several classes


# ----------------------------------------------------------------------------------------------------
# Folders of files.
# ----------------------------------------------------------------------------------------------------


def _mixed_folder(folder, sizes):
  os.makedirs(folder, exist_ok=True)
  for index, (width, height) in enumerate(sizes):
    Image.fromarray(_random_image(height, width, index)).save(folder / f'img{index}_{width}x{height}.jpg')
  (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not really a JPEG')
  return folder


def test_mixed_sizes_folder_compiles_once_and_skips_the_corrupt_file(tmp_path, tiny_voc, capsys):
  config, variables, _ = tiny_voc
  sizes = [(100, 80), (333, 500), (640, 480), (1024, 768), (2000, 1500)]  # width x height
  folder = _mixed_folder(tmp_path / 'in', sizes)
  predictor = predict.Predictor(config, variables, batch_size=2)
  summary = predict.predict_files(predictor, predict.find_images(str(folder)), str(tmp_path / 'out'))
  assert list(summary['skipped']) == [str(folder / 'corrupt.jpg')]
  assert 'corrupt.jpg: not a readable image' in summary['skipped'][str(folder / 'corrupt.jpg')]
  assert 'Skipped' in capsys.readouterr().err
  assert len(summary['images']) == 5
  assert predictor.num_compiles == 1 and predictor._predict_batch._cache_size() == 1  # one bucket: the crop
  for index, (width, height) in enumerate(sizes):
    name = f'img{index}_{width}x{height}'
    labels = visualize.read_label_png(str(tmp_path / 'out' / 'labels' / f'{name}.png'))
    assert labels.shape == (height, width)
    with Image.open(tmp_path / 'out' / 'labels' / f'{name}.png') as png:
      assert png.mode == 'P'
      np.testing.assert_array_equal(np.asarray(png.convert('RGB'))[0, 0],
                                    visualize.voc_colormap()[labels[0, 0]])
    # Shown at most 1024 px on the long side, enlarged to >= 256 px high; image | prediction side by side.
    scale = min(1.0, 1024 / max(width, height))
    shown_width = round(width * scale) * max(1, -(-256 // round(height * scale)))
    with Image.open(tmp_path / 'out' / 'overlays' / f'{name}.png') as overlay:
      assert overlay.mode == 'RGB' and 2 * shown_width < overlay.size[0] < 2 * shown_width + 40
  written = json.loads((tmp_path / 'out' / 'predictions.json').read_text())
  assert written['settings']['large_images'] == 'resize' and len(written['images']) == 5
  assert written['settings']['class_names'][15] == 'person'


def test_pad_mode_compiles_once_per_bucket_and_is_exact_at_full_size(tmp_path, tiny_voc):
  config, variables, _ = tiny_voc
  sizes = [(20, 30), (65, 65), (50, 70), (80, 100), (60, 120)]  # (height, width), crop 65
  images = [_random_image(h, w, i) for i, (h, w) in enumerate(sizes)]
  predictor = predict.Predictor(config, variables, large_images='pad', batch_size=2)
  labels = predictor(images)
  assert [predictor.plan(h, w).bucket for h, w in sizes] == [(65, 65), (65, 65), (65, 129), (129, 129),
                                                             (65, 129)]
  assert predictor.num_compiles == 3 == predictor._predict_batch._cache_size()
  assert [l.shape for l in labels] == sizes
  model = create_model(config.model, output_stride=config.eval.output_stride)
  # 80x100 -> canvas 129x129, padded with the mean pixel as an eval crop of 129 would be.
  canvas, _ = input_pipeline.pad_to_size(images[3], np.zeros((80, 100), np.uint8), 129, 129, (127.5,) * 3,
                                         255)
  expected = jax.jit(lambda v, x: jnp.argmax(evaluate.predict_probabilities(model, v, x, (1.0,), False), -1))(
      variables, canvas[None])
  np.testing.assert_array_equal(labels[3], np.asarray(expected)[0, :80, :100])


# ----------------------------------------------------------------------------------------------------
# Checkpoints and the command line.
# ----------------------------------------------------------------------------------------------------


def test_from_checkpoint_accepts_workdir_checkpoints_and_step_dirs(tiny_voc, tmp_path):
  config, variables, workdir = tiny_voc
  for path in (workdir, os.path.join(workdir, 'checkpoints'), os.path.join(workdir, 'checkpoints', '3')):
    loaded, loaded_config, step = predict.load_checkpoint(path)
    assert step == 3 and loaded_config.to_dict() == checkpoint.config_to_dict(config)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  image = _random_image(30, 40, 5)
  predictor = predict.Predictor.from_checkpoint(os.path.join(workdir, 'checkpoints', '3'))
  assert predictor.class_names[15] == 'person' and predictor.crop_size == (65, 65)
  np.testing.assert_array_equal(predictor(image), predict.Predictor(config, variables)(image))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'--checkpoint=.*not_a_run: expected a training workdir'):
    predict.Predictor.from_checkpoint(str(tmp_path / 'not_a_run'))
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint step'):
    predict.Predictor.from_checkpoint(str(tmp_path / 'empty'))
  with pytest.raises(checkpoint.CheckpointError, match=r'no step 4; available: \[3\]'):
    predict.load_checkpoint(workdir, step=4)
  assert not os.path.exists(tmp_path / 'not_a_run')  # nothing created where nothing was found


def test_importing_defines_no_flags():
  import deeplab_jax.export  # pylint: disable=g-import-not-at-top,unused-import
  for name in ('checkpoint', 'input', 'output', 'large_images', 'save_probabilities', 'outputs',
               'saved_model'):
    assert name not in flags.FLAGS


def test_command_line_writes_outputs_and_reports_skipped_files(tiny_voc, tmp_path):
  _, _, workdir = tiny_voc
  folder = _mixed_folder(tmp_path / 'in', [(50, 40), (90, 30)])
  result = subprocess.run(
      [sys.executable, '-m', 'deeplab_jax.predict', f'--checkpoint={workdir}', f'--input={folder}',
       f'--output={tmp_path / "out"}', '--eval_scales=1.0', '--noflip'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Wrote 2 label PNGs' in result.stdout and '1 compiled shape' in result.stdout
  assert 'Skipped 1 unreadable file' in result.stdout and 'corrupt.jpg' in result.stdout
  assert sorted(os.listdir(tmp_path / 'out' / 'labels')) == ['img0_50x40.png', 'img1_90x30.png']
  assert sorted(os.listdir(tmp_path / 'out' / 'overlays')) == ['img0_50x40.png', 'img1_90x30.png']
  only_corrupt = subprocess.run(
      [sys.executable, '-m', 'deeplab_jax.predict', f'--checkpoint={workdir}',
       f'--input={folder / "corrupt.jpg"}', f'--output={tmp_path / "out2"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert only_corrupt.returncode == 1 and 'corrupt.jpg' in only_corrupt.stdout


# ----------------------------------------------------------------------------------------------------
# The official 8-bit MobileNetV2 model on real VOC images (slow: full model at 513x513).
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_tflite_model_label_pngs_give_evals_miou(tmp_path, shared_data):
  from configs import voc_mobilenetv2  # pylint: disable=g-import-not-at-top
  from deeplab_jax import convert  # pylint: disable=g-import-not-at-top
  config = voc_mobilenetv2.get_config()
  tflite = shared_data / 'official_tflite' / 'deeplabv3_mnv2_pascal_quant.tflite'
  convert.convert_and_save(str(tflite), config, str(tmp_path / 'converted'))
  ids = VOC_IDS + ('2007_000032',)  # + aeroplanes and people, 500x281
  miou, confusion, eval_summary, predictor = _predict_then_evaluate(
      tmp_path, shared_data, config, str(tmp_path / 'converted'), ids, batch_size=2)
  assert abs(miou - eval_summary['miou']) < 1e-4  # 0.01 points
  assert np.abs(confusion - np.asarray(eval_summary['confusion'])).sum() <= 1e-5 * confusion.sum()
  assert miou > 0.5  # a real model on real images
  image = predict.load_image(str(shared_data / 'voc2012_train_subset' / 'JPEGImages' / f'{ids[3]}.jpg'))
  labels = visualize.read_label_png(str(tmp_path / 'out' / 'labels' / f'{ids[3]}.png'))
  np.testing.assert_array_equal(labels, predictor(image))  # the PNG decodes to the model's argmax
  assert {1, 15} <= set(np.unique(labels))  # aeroplane and person found
