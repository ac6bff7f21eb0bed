"""Colour maps, class-index palette PNGs and overlay panels with a legend naming the classes shown.

Colour maps are those of the official DeepLab visualisation
(`research/deeplab/utils/get_dataset_colormap.py`): PASCAL VOC's bit-interleaved map (also used for
`folder` and `synthetic_scenes`), the Cityscapes train-id colours and the ADE20K benchmark colours. Each is
returned with 256 entries so that it can serve directly as the palette of an 8-bit PNG.

Label PNGs are palette ('P' mode) PNGs whose pixel values are the class indices: an image viewer shows the
dataset's colours, and `read_label_png` (or `np.asarray(PIL.Image.open(path))`) gives the indices back.

Overlays put the image and its colour-blended label maps side by side over a legend: one colour swatch and
the class name (and, for predictions, its share of the image) per class present, in a font Pillow ships,
sized to the picture.
"""
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

VOID_LABEL = 255  # VOC's "void" (object borders, difficult regions); other datasets' ignore value in eval
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_SWATCH_BORDER = (60, 60, 60)

# Cityscapes train ids 0..18 (road ... bicycle), the official colours.
_CITYSCAPES = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
               (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
               (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
               (0, 80, 100), (0, 0, 230), (119, 11, 32))

# ADE20K SceneParsing, labels 0 ('other') .. 150, the official benchmark colours.
_ADE20K = (
    '0 0 0; 120 120 120; 180 120 120; 6 230 230; 80 50 50; 4 200 3; 120 120 80; 140 140 140; 204 5 255; '
    '230 230 230; 4 250 7; 224 5 255; 235 255 7; 150 5 61; 120 120 70; 8 255 51; 255 6 82; 143 255 140; '
    '204 255 4; 255 51 7; 204 70 3; 0 102 200; 61 230 250; 255 6 51; 11 102 255; 255 7 71; 255 9 224; '
    '9 7 230; 220 220 220; 255 9 92; 112 9 255; 8 255 214; 7 255 224; 255 184 6; 10 255 71; 255 41 10; '
    '7 255 255; 224 255 8; 102 8 255; 255 61 6; 255 194 7; 255 122 8; 0 255 20; 255 8 41; 255 5 153; '
    '6 51 255; 235 12 255; 160 150 20; 0 163 255; 140 140 140; 250 10 15; 20 255 0; 31 255 0; 255 31 0; '
    '255 224 0; 153 255 0; 0 0 255; 255 71 0; 0 235 255; 0 173 255; 31 0 255; 11 200 200; 255 82 0; '
    '0 255 245; 0 61 255; 0 255 112; 0 255 133; 255 0 0; 255 163 0; 255 102 0; 194 255 0; 0 143 255; '
    '51 255 0; 0 82 255; 0 255 41; 0 255 173; 10 0 255; 173 255 0; 0 255 153; 255 92 0; 255 0 255; '
    '255 0 245; 255 0 102; 255 173 0; 255 0 20; 255 184 184; 0 31 255; 0 255 61; 0 71 255; 255 0 204; '
    '0 255 194; 0 255 82; 0 10 255; 0 112 255; 51 0 255; 0 194 255; 0 122 255; 0 255 163; 255 153 0; '
    '0 255 10; 255 112 0; 143 255 0; 82 0 255; 163 255 0; 255 235 0; 8 184 170; 133 0 255; 0 255 92; '
    '184 0 255; 255 0 31; 0 184 255; 0 214 255; 255 0 112; 92 255 0; 0 224 255; 112 224 255; 70 184 160; '
    '163 0 255; 153 0 255; 71 255 0; 255 0 163; 255 204 0; 255 0 143; 0 255 235; 133 255 0; 255 0 235; '
    '245 0 255; 255 0 122; 255 245 0; 10 190 212; 214 255 0; 0 204 255; 20 0 255; 255 255 0; 0 153 255; '
    '0 41 255; 0 255 204; 41 0 255; 41 255 0; 173 0 255; 0 245 255; 71 0 255; 122 0 255; 0 255 184; '
    '0 92 255; 184 255 0; 0 133 255; 255 214 0; 25 194 194; 102 255 0; 92 0 255')


def voc_colormap(num_colours: int = 256) -> np.ndarray:
  """`[N, 3]` uint8 PASCAL VOC colour map: the bits of the class id spread over R, G, B from the top bit.

  Class 1 (aeroplane) is (128, 0, 0), 15 (person) (192, 128, 128), 255 (void) (224, 224, 192).
  """
  ids = np.arange(num_colours)
  colours = np.zeros((num_colours, 3), np.int64)
  for shift in range(7, -1, -1):
    for channel in range(3):
      colours[:, channel] |= ((ids >> channel) & 1) << shift
    ids = ids >> 3
  return colours.astype(np.uint8)


def cityscapes_colormap() -> np.ndarray:
  """`[256, 3]` uint8: the Cityscapes colours of train ids 0..18, black elsewhere (255 = ignored)."""
  colours = np.zeros((256, 3), np.uint8)
  colours[:len(_CITYSCAPES)] = _CITYSCAPES
  return colours


def ade20k_colormap() -> np.ndarray:
  """`[256, 3]` uint8: the ADE20K benchmark colours of labels 0 ('other', black) .. 150, black elsewhere."""
  table = np.array([[int(v) for v in entry.split()] for entry in _ADE20K.split(';')], np.uint8)
  colours = np.zeros((256, 3), np.uint8)
  colours[:len(table)] = table
  return colours


def colormap(dataset_name: str) -> np.ndarray:
  """`[256, 3]` uint8 colour map for `config.dataset.name`: VOC's for VOC, `folder` and `synthetic_scenes`.

  Raises:
    ValueError: for a dataset name without a colour map.
  """
  if dataset_name in ('voc2012_segmentation', 'folder', 'synthetic_scenes'):
    return voc_colormap()
  if dataset_name == 'cityscapes':
    return cityscapes_colormap()
  if dataset_name == 'ade20k':
    return ade20k_colormap()
  raise ValueError(f'No colour map for config.dataset.name={dataset_name!r}; known: voc2012_segmentation, '
                   'cityscapes, ade20k, folder, synthetic_scenes.')


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """`[H, W, 3]` uint8 colours of class-index map `label` `[H, W]` (indices taken modulo the palette size)."""
  return palette[np.asarray(label).astype(np.int64) % len(palette)]


# ----------------------------------------------------------------------------------------------------
# Label PNGs.
# ----------------------------------------------------------------------------------------------------


def write_label_png(path: str, label: np.ndarray, palette: np.ndarray) -> None:
  """Writes class indices `label` `[H, W]` as a palette PNG: viewers show colours, readers get indices.

  Raises:
    ValueError: if an index does not fit one byte (more than 256 classes cannot be a palette PNG).
  """
  label = np.asarray(label)
  if label.ndim != 2:
    raise ValueError(f'write_label_png({path!r}): expected a [H, W] class-index map, got shape '
                     f'{label.shape}.')
  if label.size and (label.min() < 0 or label.max() > 255):
    raise ValueError(f'write_label_png({path!r}): class indices {label.min()}..{label.max()} do not fit a '
                     'palette PNG (0..255).')
  image = Image.fromarray(label.astype(np.uint8))
  image.putpalette(np.asarray(palette, np.uint8)[:256].reshape(-1).tolist())  # 'L' becomes 'P'.
  image.save(path, optimize=False)


def read_label_png(path: str) -> np.ndarray:
  """`[H, W]` uint8 class indices of a palette (or grey-level) label PNG.

  Raises:
    ValueError: for a colour (RGB) picture, whose pixels are colours rather than class indices.
  """
  with Image.open(path) as image:
    if image.mode not in ('P', 'L'):
      raise ValueError(f'{path} is a {image.mode} image, not a class-index PNG (palette or grey levels): a '
                       'colour rendering of a mask cannot be read back as class indices.')
    return np.asarray(image).copy()


# ----------------------------------------------------------------------------------------------------
# Overlays with legends.
# ----------------------------------------------------------------------------------------------------


def font(size: int) -> ImageFont.ImageFont:
  """Pillow's bundled font at `size` pixels (Pillow >= 10.1 with FreeType), else its small bitmap font."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: fixed-size bitmap font.
    return ImageFont.load_default()


def font_size_for(height: int, width: int) -> int:
  """Legend text height for a panel of `height` x `width` pixels: legible at a glance, never huge."""
  return int(np.clip(round(max(height, width) / 24), 14, 48))


def legend(entries: Sequence[tuple[Sequence[int], str]], width: int, font_size: int) -> np.ndarray:
  """`[h, width, 3]` uint8 legend: for each `(colour, text)` a bordered colour swatch and the text.

  Entries flow left to right and wrap onto as many rows as `width` needs.
  """
  text_font = font(font_size)
  pad, swatch, gap = max(4, font_size // 2), font_size, max(4, font_size // 3)
  row_height = int(font_size * 1.4)
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  placed, x, row = [], pad, 0
  for colour, text in entries:
    item_width = swatch + gap + int(np.ceil(measure.textlength(text, font=text_font)))
    if x > pad and x + item_width > width - pad:
      x, row = pad, row + 1
    placed.append((x, row, colour, text))
    x += item_width + 2 * pad
  rows = row + 1 if entries else 0
  canvas = Image.new('RGB', (width, rows * row_height + 2 * pad if rows else 0), _BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for x, row, colour, text in placed:
    top = pad + row * row_height + (row_height - swatch) // 2
    draw.rectangle([x, top, x + swatch - 1, top + swatch - 1], fill=tuple(int(c) for c in colour),
                   outline=_SWATCH_BORDER, width=max(1, font_size // 14))
    draw.text((x + swatch + gap, top + swatch // 2), text, fill=_TEXT, font=text_font, anchor='lm')
  return np.asarray(canvas)


def legend_entries(labels: Sequence[np.ndarray], class_names: Sequence[str], palette: np.ndarray,
                   with_share: bool = False) -> list[tuple[np.ndarray, str]]:
  """`(colour, name)` of each class present in any of `labels`, largest first.

  Indices outside `class_names` (VOC's 255) are named 'void / ignored'. `with_share` appends each class's
  share of the pixels of `labels[0]`, e.g. 'person 41%'.
  """
  counts = sum(np.bincount(np.asarray(label).astype(np.int64).ravel() % 256, minlength=256)
               for label in labels)
  first = np.bincount(np.asarray(labels[0]).astype(np.int64).ravel() % 256, minlength=256)
  entries = []
  for index in np.argsort(-counts, kind='stable'):
    if counts[index] == 0:
      break
    name = class_names[index] if index < len(class_names) else 'void / ignored'
    if with_share:
      share = 100.0 * first[index] / max(1, first.sum())
      name = f'{name} {share:.0f}%' if share >= 1 or share == 0 else f'{name} <1%'
    entries.append((palette[index], name))
  return entries


def boundaries(label: np.ndarray, thickness: int = 1) -> np.ndarray:
  """`[H, W]` bool: pixels within `thickness` of a change of class (where two regions meet)."""
  label = np.asarray(label)
  edge = np.zeros(label.shape, bool)
  edge[:, 1:] |= label[:, 1:] != label[:, :-1]
  edge[1:, :] |= label[1:, :] != label[:-1, :]
  for _ in range(max(0, thickness - 1)):  # grow by one pixel in each direction per step
    grown = edge.copy()
    grown[:, 1:] |= edge[:, :-1]
    grown[:, :-1] |= edge[:, 1:]
    grown[1:, :] |= edge[:-1, :]
    grown[:-1, :] |= edge[1:, :]
    edge = grown
  return edge


def blend(image: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float = 0.6,
          outline: int = 0) -> np.ndarray:
  """`[H, W, 3]` uint8: `(1 - alpha) * image + alpha * colours(label)`, region outlines white if `outline`.

  Outlines (`outline` pixels wide) keep neighbouring regions apart when their colours are close or dark
  (VOC's background, cat and potted plant are near black).
  """
  image = np.clip(np.asarray(image, np.float32), 0, 255)
  colours = colorize(label, palette).astype(np.float32)
  blended = ((1.0 - alpha) * image + alpha * colours + 0.5).astype(np.uint8)
  if outline:
    blended[boundaries(label, outline)] = _BACKGROUND
  return blended


def _outline_width(height: int, width: int) -> int:
  return max(1, round(max(height, width) / 400))


def _side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str], font_size: int) -> np.ndarray:
  """Panels in a row with white gutters, each under its title."""
  height = panels[0].shape[0]
  gutter = max(2, font_size // 3)
  title_height = int(font_size * 1.6)
  width = sum(p.shape[1] for p in panels) + gutter * (len(panels) - 1)
  canvas = Image.new('RGB', (width, height + title_height), _BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  text_font = font(font_size)
  x = 0
  for panel, title in zip(panels, titles):
    canvas.paste(Image.fromarray(panel), (x, title_height))
    draw.text((x + panel.shape[1] // 2, title_height // 2), title, fill=_TEXT, font=text_font, anchor='mm')
    x += panel.shape[1] + gutter
  return np.asarray(canvas)


def _with_legend(row: np.ndarray, entries, font_size: int) -> np.ndarray:
  key = legend(entries, row.shape[1], font_size)
  return np.concatenate([row, key], axis=0) if key.size else row


def _enlarge(arrays: Sequence[np.ndarray], min_height: int) -> list[np.ndarray]:
  """Nearest-neighbour integer enlargement so small crops (tests, tiny configs) stay legible."""
  factor = max(1, -(-min_height // arrays[0].shape[0]))
  return [np.repeat(np.repeat(a, factor, axis=0), factor, axis=1) if factor > 1 else a for a in arrays]


def _shrink(image: np.ndarray, label: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
  """Downscales image (bilinear) and label (nearest) so the longer side is at most `max_side`."""
  height, width = label.shape
  if max(height, width) <= max_side:
    return image, label
  scale = max_side / max(height, width)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  image = np.asarray(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize(size, Image.BILINEAR))
  label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST))
  return image, label


def prediction_overlay(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str], palette: np.ndarray,
                       alpha: float = 0.6, max_side: int = 1024, min_height: int = 256) -> np.ndarray:
  """The picture a user looks at: image | prediction colours blended over it, outlined, above a legend.

  Args:
    image: `[H, W, 3]` RGB pixels in [0, 255].
    labels: `[H, W]` predicted class indices.
    class_names: one name per class index.
    palette: `[256, 3]` uint8 colour map (`colormap(config.dataset.name)`).
    alpha: weight of the class colours in the blend.
    max_side: larger images are shown downscaled to this longer side (the label PNG keeps full size).
    min_height: smaller images are enlarged (nearest, integer factor) to at least this height.

  Returns:
    `[H', 2W' + gutter, 3]` uint8 panel with titles and a legend naming each class present with its share
    of the image, largest first.
  """
  image = np.clip(np.asarray(image, np.float32), 0, 255).astype(np.uint8)
  labels = np.asarray(labels)
  entries = legend_entries([labels], class_names, palette, with_share=True)
  image, labels = _shrink(image, labels, max_side)
  image, labels = _enlarge([image, labels], min_height)
  size = font_size_for(*labels.shape)
  outline = _outline_width(*labels.shape)
  row = _side_by_side([image, blend(image, labels, palette, alpha, outline)], ['image', 'prediction'], size)
  return _with_legend(row, entries, size)


def overlay_panel(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, class_names: Sequence[str],
                  palette: Optional[np.ndarray] = None, alpha: float = 0.6,
                  min_height: int = 256) -> np.ndarray:
  """Eval panel: image | ground truth blended | prediction blended, above a legend of the classes in either.

  Args:
    image: `[H, W, 3]` pixels in [0, 255] (float or uint8; e.g. a padded eval crop).
    label: `[H, W]` ground-truth indices (VOC's 255 drawn in the VOC void colour, named 'void / ignored').
    prediction: `[H, W]` predicted indices.
    class_names: one name per class.
    palette: `[256, 3]` colour map; default VOC's.
    alpha: weight of the class colours.
    min_height: small crops are enlarged (nearest, integer factor) to at least this height, so the legend
      text stays legible next to them.

  Returns:
    `[H', 3W' + 2 gutters, 3]` uint8 panel with titles and the legend underneath.
  """
  palette = voc_colormap() if palette is None else palette
  image = np.clip(np.asarray(image, np.float32), 0, 255).astype(np.uint8)
  label, prediction = np.asarray(label), np.asarray(prediction)
  entries = legend_entries([label, prediction], class_names, palette)
  image, label, prediction = _enlarge([image, label, prediction], min_height)
  size = font_size_for(*label.shape)
  outline = _outline_width(*label.shape)
  row = _side_by_side([image, blend(image, label, palette, alpha, outline),
                       blend(image, prediction, palette, alpha, outline)],
                      ['image', 'ground truth', 'prediction'], size)
  return _with_legend(row, entries, size)
