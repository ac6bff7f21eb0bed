"""Tests for deeplab_jax.visualize: colour maps, palette PNG round trips, overlays and their legends."""
import numpy as np
from PIL import Image
import pytest

from deeplab_jax import datasets
from deeplab_jax import visualize
from deeplab_jax.datasets import ade20k
from deeplab_jax.datasets import cityscapes
from deeplab_jax.datasets import voc


def test_colormaps_match_the_official_tables():
  palette = visualize.voc_colormap()
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  np.testing.assert_array_equal(palette[:4], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]])
  np.testing.assert_array_equal(palette[15], [192, 128, 128])  # person
  np.testing.assert_array_equal(palette[255], [224, 224, 192])  # void
  assert len({tuple(c) for c in palette}) == 256  # every index its own colour

  city = visualize.cityscapes_colormap()
  np.testing.assert_array_equal(city[0], [128, 64, 128])  # road
  np.testing.assert_array_equal(city[cityscapes.CLASS_NAMES.index('person')], [220, 20, 60])
  np.testing.assert_array_equal(city[18], [119, 11, 32])  # bicycle
  assert not city[19:].any()

  ade = visualize.ade20k_colormap()
  np.testing.assert_array_equal(ade[0], [0, 0, 0])  # 'other'
  np.testing.assert_array_equal(ade[ade20k.CLASS_NAMES.index('person')], [150, 5, 61])
  np.testing.assert_array_equal(ade[ade20k.CLASS_NAMES.index('sky')], [6, 230, 230])
  np.testing.assert_array_equal(ade[150], [92, 0, 255])
  assert not ade[151:].any() and len(ade20k.CLASS_NAMES) == 151

  for name in ('voc2012_segmentation', 'folder', 'synthetic_scenes'):
    np.testing.assert_array_equal(visualize.colormap(name), palette)
  np.testing.assert_array_equal(visualize.colormap('cityscapes'), city)
  np.testing.assert_array_equal(visualize.colormap('ade20k'), ade)
  assert set(datasets.DATASET_NAMES) == {'voc2012_segmentation', 'folder', 'synthetic_scenes', 'cityscapes',
                                         'ade20k'}
  with pytest.raises(ValueError, match="No colour map for config.dataset.name='coco'"):
    visualize.colormap('coco')


def test_label_png_round_trip_opens_as_colours(tmp_path):
  label = np.array([[0, 1, 15], [20, 255, 3]], np.int32)
  path = str(tmp_path / 'label.png')
  visualize.write_label_png(path, label, visualize.voc_colormap())
  np.testing.assert_array_equal(visualize.read_label_png(path), label)
  with Image.open(path) as image:
    assert image.mode == 'P'
    np.testing.assert_array_equal(np.asarray(image), label)
    colours = np.asarray(image.convert('RGB'))
  np.testing.assert_array_equal(colours, visualize.voc_colormap()[label])

  with pytest.raises(ValueError, match=r'class indices 0..300 do not fit a palette PNG'):
    visualize.write_label_png(str(tmp_path / 'big.png'), np.array([[0, 300]]), visualize.voc_colormap())
  Image.fromarray(colours).save(tmp_path / 'colours.png')
  with pytest.raises(ValueError, match=r'colours.png is a RGB image, not a class-index PNG'):
    visualize.read_label_png(str(tmp_path / 'colours.png'))


def test_blend_and_legend_entries():
  image = np.full((2, 2, 3), 100.0)
  label = np.array([[1, 255], [0, 0]])
  blended = visualize.blend(image, label, visualize.voc_colormap(), alpha=0.5)
  np.testing.assert_array_equal(blended[0, 0], [114, 50, 50])  # (100 + 128) / 2, 100 / 2, 100 / 2
  np.testing.assert_array_equal(blended[0, 1], [162, 162, 146])  # over the void colour
  entries = visualize.legend_entries([np.array([[15, 15, 15, 0], [15, 15, 0, 2]])], voc.CLASS_NAMES,
                                     visualize.voc_colormap(), with_share=True)
  assert [name for _, name in entries] == ['person 62%', 'background 25%', 'bicycle 12%']
  np.testing.assert_array_equal(entries[0][0], [192, 128, 128])
  both = visualize.legend_entries([np.array([[255, 1]]), np.array([[1, 1]])], voc.CLASS_NAMES,
                                  visualize.voc_colormap())
  assert [name for _, name in both] == ['aeroplane', 'void / ignored']
  tiny_share = visualize.legend_entries([np.array([1] + [0] * 199)], voc.CLASS_NAMES,
                                        visualize.voc_colormap(), with_share=True)
  assert [name for _, name in tiny_share] == ['background 100%', 'aeroplane <1%']


def test_legend_draws_swatches_and_wraps():
  palette = visualize.voc_colormap()
  entries = [(palette[i], voc.CLASS_NAMES[i]) for i in (1, 15, 12)]
  wide = visualize.legend(entries, 800, 16)
  narrow = visualize.legend(entries, 150, 16)
  assert wide.shape[1] == 800 and narrow.shape[1] == 150
  assert narrow.shape[0] > 2 * wide.shape[0] - 20  # three rows instead of one
  for legend in (wide, narrow):
    for i in (1, 15, 12):
      assert np.all(legend == palette[i], axis=-1).sum() >= 12 * 12  # each swatch drawn in its class colour
    assert (legend.sum(-1) < 150).sum() > 100  # and dark text beside it
  assert visualize.legend([], 100, 16).shape == (0, 100, 3)
  assert visualize.font_size_for(375, 500) == 21 and visualize.font_size_for(33, 33) == 14
  assert visualize.font_size_for(3000, 4000) == 48


def _regions(panel, colour):
  return np.all(panel == np.asarray(colour, np.uint8), axis=-1)


def test_prediction_overlay_layout_and_legend():
  palette = visualize.voc_colormap()
  image = np.full((300, 400, 3), 90, np.uint8)
  labels = np.zeros((300, 400), np.int32)
  labels[50:200, 100:300] = 15  # person
  labels[250:, :] = 7  # car
  panel = visualize.prediction_overlay(image, labels, voc.CLASS_NAMES, palette)
  size = visualize.font_size_for(300, 400)
  title = int(size * 1.6)
  gutter = max(2, size // 3)
  assert panel.shape[1] == 2 * 400 + gutter
  np.testing.assert_array_equal(panel[title:title + 300, :400], image)  # the image, untouched
  np.testing.assert_array_equal(panel[title + 100, 400 + gutter + 200],
                                visualize.blend(image, labels, palette)[100, 200])
  legend = panel[title + 300:]
  assert legend.shape[0] > size
  for present in (0, 15, 7):
    assert _regions(legend, palette[present]).sum() >= (size - 2) ** 2
  assert not _regions(legend, palette[1]).any()  # aeroplane is absent: no swatch


def test_prediction_overlay_shrinks_large_and_enlarges_small_images():
  palette = visualize.voc_colormap()
  large = visualize.prediction_overlay(np.zeros((1500, 2000, 3), np.uint8), np.zeros((1500, 2000), np.int32),
                                       voc.CLASS_NAMES, palette)
  assert 2 * 1024 <= large.shape[1] <= 2 * 1024 + 20
  small = visualize.prediction_overlay(np.zeros((33, 20, 3), np.uint8), np.zeros((33, 20), np.int32),
                                       voc.CLASS_NAMES, palette)
  assert small.shape[1] == 2 * 20 * 8 + 4  # enlarged x8 to >= 256 px high


def test_eval_overlay_panel_shows_image_truth_and_prediction():
  image = np.full((33, 33, 3), 127.5, np.float32)  # a padded eval crop is float
  label = np.full((33, 33), 255, np.int32)
  label[:20, :20] = 3
  prediction = np.zeros((33, 33), np.int32)
  prediction[:10] = 8
  panel = visualize.overlay_panel(image, label, prediction, voc.CLASS_NAMES)
  size = visualize.font_size_for(33 * 8, 33 * 8)
  gutter, title = max(2, size // 3), int(size * 1.6)
  assert panel.shape[1] == 3 * 264 + 2 * gutter
  np.testing.assert_array_equal(panel[title, 0], [127, 127, 127])
  palette = visualize.voc_colormap()
  bird_over_grey = visualize.blend(np.full((1, 1, 3), 127), np.array([[3]]), palette)[0, 0]
  np.testing.assert_array_equal(panel[title, 264 + gutter], bird_over_grey)
  legend = panel[title + 264:]
  for present in (3, 255, 0, 8):  # bird, void, background, cat
    assert _regions(legend, palette[present]).sum() >= (size - 2) ** 2
  cityscapes_panel = visualize.overlay_panel(image, np.zeros((33, 33)), np.zeros((33, 33)),
                                             cityscapes.CLASS_NAMES, palette=visualize.cityscapes_colormap())
  assert _regions(cityscapes_panel[title + 264:], [128, 64, 128]).sum() >= (size - 2) ** 2  # road


def test_boundaries_mark_where_classes_meet():
  label = np.zeros((5, 6), np.int32)
  label[1:4, 2:5] = 7
  edge = visualize.boundaries(label)
  # The first pixel after each change, along rows and along columns.
  expected = np.zeros((5, 6), bool)
  expected[1:4, 2] = expected[1:4, 5] = True
  expected[1, 2:5] = expected[4, 2:5] = True
  np.testing.assert_array_equal(edge, expected)
  assert visualize.boundaries(label, 2).sum() > edge.sum()
  outlined = visualize.blend(np.zeros((5, 6, 3)), label, visualize.voc_colormap(), outline=1)
  np.testing.assert_array_equal(outlined[edge], np.full((edge.sum(), 3), 255))
  np.testing.assert_array_equal(outlined[~edge], visualize.blend(np.zeros((5, 6, 3)), label,
                                                                 visualize.voc_colormap())[~edge])
