"""Shared pieces of the segmentation TFDS builders: features, mask/image codecs, manual-download errors.

File format: every builder writes `array_record` files (random access, read back with
`builder.as_data_source(split)` without TensorFlow). Each example holds
  'image':    the encoded image (the original JPEG/PNG bytes when already 8-bit RGB; otherwise re-encoded
              losslessly as PNG), decoded to uint8 `[H, W, 3]`;
  'label':    a single-channel 8-bit PNG of class indices, decoded to uint8 `[H, W, 1]`; unlabelled
              pixels hold the dataset's ignore label (255; ADE20K keeps its official 0);
  'image_id': the source file stem.
Masks are always re-encoded as mode 'L' PNGs of indices: a palette PNG ('P') read as grey levels, or
decoded by OpenCV's IMREAD_UNCHANGED, would give colours or luminances instead of class ids.
Builders encode everything themselves with PIL, so `download_and_prepare` needs no TensorFlow.
"""
import io
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

IGNORE_LABEL = 255


class ManualDownloadError(FileNotFoundError):
  """A manual download is missing or incomplete; the message says what to put where."""


def describe_missing(dataset: str, manual_dir: str, entries: Sequence[tuple[str, str, str]],
                     hint: str = '') -> str:
  """Builds the error text for missing manual downloads.

  Args:
    dataset: the dataset name (`config.dataset.name`).
    manual_dir: the directory searched (`config.dataset.manual_dir`).
    entries: (expected path, accepted alternative, where to get it) for each missing item.
    hint: an extra sentence appended at the end.

  Returns:
    A multi-line message naming each expected file, where to put it and where to get it.
  """
  lines = [f"Dataset '{dataset}' needs manual downloads in {manual_dir} (config.dataset.manual_dir). "
           'Missing:']
  for path, alternative, url in entries:
    lines.append(f'  - {path}' + (f' (or {alternative})' if alternative else '') + f'  <- get it from {url}')
  if hint:
    lines.append(hint)
  return '\n'.join(lines)


def list_examples(names: Iterable[str], limit: int = 10) -> str:
  """Formats up to `limit` names and a count of the rest, for error messages."""
  names = list(names)
  shown = ', '.join(names[:limit])
  return shown + (f' ... and {len(names) - limit} more' if len(names) > limit else '')


def decode_mask(data: bytes, name: str) -> np.ndarray:
  """Decodes a class-index mask PNG to uint8 `[H, W]` indices.

  Palette ('P') images give their palette indices, which are the class ids; they must never go
  through `convert('L')`, which would turn colours into luminances.

  Args:
    data: the encoded mask.
    name: the file name, for errors.

  Returns:
    uint8 `[H, W]` class indices.
  """
  with Image.open(io.BytesIO(data)) as mask:
    if mask.mode not in ('P', 'L'):
      raise ValueError(f'Mask {name} has PIL mode {mask.mode!r}; masks must hold class indices as a palette '
                       "('P') or single-channel 8-bit ('L') PNG, not colours.")
    return np.array(mask, dtype=np.uint8)


def encode_mask(mask: np.ndarray) -> bytes:
  """Encodes uint8 `[H, W]` class indices as a single-channel ('L') PNG."""
  if mask.dtype != np.uint8 or mask.ndim != 2:
    raise ValueError(f'encode_mask wants uint8 [H, W]; got {mask.dtype} {mask.shape}')
  buffer = io.BytesIO()
  Image.fromarray(mask, mode='L').save(buffer, format='PNG')
  return buffer.getvalue()


def encode_png(image: np.ndarray) -> bytes:
  """Encodes uint8 `[H, W, 3]` RGB as PNG (lossless)."""
  buffer = io.BytesIO()
  Image.fromarray(image, mode='RGB').save(buffer, format='PNG')
  return buffer.getvalue()


def normalize_image(data: bytes, name: str) -> tuple[bytes, tuple[int, int]]:
  """Returns image bytes that decode to 8-bit RGB, and the image's (height, width).

  JPEG/PNG files already in RGB are kept byte for byte; greyscale, CMYK, palette or RGBA files (a few
  exist in ADE20K and in users' folders) are converted to RGB and re-encoded as PNG so every stored image
  decodes to `[H, W, 3]`.

  Args:
    data: the encoded image.
    name: the file name, for errors.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      size = (image.height, image.width)
      if image.format in ('JPEG', 'PNG') and image.mode == 'RGB':
        return data, size
      rgb = np.array(image.convert('RGB'))
  except OSError as e:
    raise ValueError(f'Cannot decode image {name}: {e}') from e
  return encode_png(rgb), size


def check_mask_values(mask: np.ndarray, num_classes: int, name: str, ignore_label: int = IGNORE_LABEL):
  """Raises unless every mask value is a class id in [0, num_classes) or `ignore_label`."""
  counts = np.bincount(mask.ravel(), minlength=256)
  counts[:num_classes] = 0
  counts[ignore_label] = 0
  bad = np.flatnonzero(counts)
  if bad.size:
    raise ValueError(f'Mask {name} holds values {bad.tolist()} outside the class ids 0..{num_classes - 1} '
                     f'and the ignore label {ignore_label}.')


def check_same_size(image_size: tuple[int, int], mask: np.ndarray, image_name: str, mask_name: str):
  """Raises when an image and its mask differ in size (they would misalign every pixel)."""
  if tuple(mask.shape[:2]) != tuple(image_size):
    raise ValueError(f'Image {image_name} is {image_size[0]}x{image_size[1]} but its mask {mask_name} is '
                     f'{mask.shape[0]}x{mask.shape[1]}.')


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the deeplab_jax builders: fixed features, array_record files, an explicit manual dir.

  Builders are not registered with TFDS (names such as 'cityscapes' already exist there); create them
  with `deeplab_jax.datasets.get_builder(config.dataset)`.
  """

  VERSION = tfds.core.Version('1.0.0')
  # TFDS locates a builder's source file only to find a download-checksums file beside it, and on
  # Python >= 3.9 that lookup imports the undeclared `importlib_resources`. These builders download
  # nothing, so they opt out of the lookup.
  code_path = None
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  CLASS_NAMES: tuple[str, ...] = ()
  HOMEPAGE = ''
  DESCRIPTION = ''

  def __init__(self, *, manual_dir: str | None = None, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    self._deeplab_manual_dir = os.fspath(manual_dir) if manual_dir else None
    super().__init__(**kwargs)

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.CLASS_NAMES)

  @property
  def ignore_label(self) -> int:
    """The label value of unlabelled pixels in the stored masks."""
    return IGNORE_LABEL

  def manual_path(self) -> str:
    """The manual-download directory: the one given, else TFDS's `<data_dir>/downloads/manual`."""
    if self._deeplab_manual_dir:
      return self._deeplab_manual_dir
    return os.path.join(os.fspath(self._data_dir_root), 'downloads', 'manual')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION or (self.__doc__ or '').split('\n')[0],
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'image_id': tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE or None,
        metadata=tfds.core.MetadataDict(class_names=list(self.class_names), ignore_label=self.ignore_label),
    )

  @staticmethod
  def make_example(image_bytes: bytes, mask: np.ndarray, image_id: str) -> dict:
    """One stored example from encoded image bytes and uint8 `[H, W]` class indices."""
    return {'image': image_bytes, 'label': encode_mask(mask), 'image_id': image_id}
