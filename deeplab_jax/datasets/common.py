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

Preparation decodes every image and mask fully, so that training never meets an undecodable file. A bad
file (unreadable, truncated, not an image, a mask of colours, wrong size or class values) does not stop the
preparation at once: every bad file is collected, and one `BadFilesError` at the end names each with its
reason; TFDS then removes the incomplete output, so nothing half-written is ever read.
"""
import io
import os
import tarfile
from typing import Callable, Iterable, Mapping, Optional, Sequence
import zipfile
import zlib

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError
import tensorflow_datasets as tfds

from deeplab_jax.datasets import archives

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


def check_split_complete(dataset: str, split: str, stems: Sequence[str], expected: int, where: str,
                         labels: archives.FileTree, label_path: Callable[[str], str], missing_what: str,
                         fix: str) -> None:
  """Raises `ManualDownloadError` unless a split has its `expected` images and every one its label file.

  Args:
    dataset: the dataset name.
    split: the split checked.
    stems: the images found.
    expected: the split's published size.
    where: where they were looked for, as a phrase ('under images/training/', 'in <archive>').
    labels: the file tree holding the label files.
    label_path: the path in `labels` of a stem's label file.
    missing_what: what the label files are called ('annotations', 'label files').
    fix: the sentence saying what to download again.
  """
  missing = [labels.location(label_path(s)) for s in stems if not labels.exists(label_path(s))]
  if len(stems) != expected or missing:
    raise ManualDownloadError(
        f"Dataset '{dataset}': split {split} has {len(stems)} images {where} (expected {expected}) and "
        f'{len(missing)} missing {missing_what}' + (f': {list_examples(missing)}' if missing else '')
        + f'. The download is incomplete; {fix}')


class BadFileError(ValueError):
  """One source file cannot be used (unreadable, undecodable, wrong mode, size or values).

  Attributes:
    location: the file, as `FileTree.location` gives it (a path, or `archive:member`).
    reason: what is wrong with it.
  """

  def __init__(self, location: str, reason: str):
    super().__init__(f'{location}: {reason}')
    self.location = location
    self.reason = reason


class BadFilesError(ValueError):
  """Several source files cannot be used; the message names every one with its reason.

  Attributes:
    problems: `{location: reason}` in the order found.
  """

  def __init__(self, problems: Mapping[str, str], dataset: str = ''):
    self.problems = dict(problems)
    what = f"Dataset '{dataset}'" if dataset else 'Dataset preparation'
    lines = [f'{what}: {len(self.problems)} source file(s) cannot be decoded or used; fix or replace each '
             'and run again (nothing was written):']
    lines += [f'  - {location}: {reason}' for location, reason in self.problems.items()]
    super().__init__('\n'.join(lines))


def describe_decode_error(data: bytes, error: Exception) -> str:
  """A short reason for an image that PIL cannot open or decode fully."""
  if not data:
    return 'empty file (0 bytes)'
  if isinstance(error, UnidentifiedImageError):
    return f'not an image PIL can read ({len(data)} bytes starting {data[:8]!r})'
  text = ' '.join(str(error).split()) or type(error).__name__
  if 'truncated' in text.lower():
    return f'truncated ({text})'
  return f'cannot be decoded ({type(error).__name__}: {text})'


def read_file(tree: archives.FileTree, relpath: str) -> bytes:
  """The bytes of `relpath` in `tree`; BadFileError naming it if the file or archive member is unreadable."""
  try:
    return tree.read(relpath)
  except (OSError, EOFError, KeyError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as e:
    raise BadFileError(tree.location(relpath),
                       f'cannot be read ({type(e).__name__}: {" ".join(str(e).split())})') from e


def decode_mask(data: bytes, name: str) -> np.ndarray:
  """Decodes a class-index mask PNG fully to uint8 `[H, W]` indices.

  Palette ('P') images give their palette indices, which are the class ids; they must never go
  through `convert('L')`, which would turn colours into luminances.

  Args:
    data: the encoded mask.
    name: the file name, for errors.

  Returns:
    uint8 `[H, W]` class indices.

  Raises:
    BadFileError: naming `name`, for an empty, truncated or undecodable file, or one that holds colours.
  """
  try:
    with Image.open(io.BytesIO(data)) as mask:
      if mask.mode not in ('P', 'L'):
        raise BadFileError(name, f"has PIL mode {mask.mode!r}; masks must hold class indices as a palette "
                           "('P') or single-channel 8-bit ('L') PNG, not colours.")
      return np.array(mask, dtype=np.uint8)  # decodes every row: truncation raises here
  except BadFileError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files.
    raise BadFileError(name, describe_decode_error(data, e)) from e


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

  The image is decoded fully here (PIL reads only the header on open, so a truncated JPEG would otherwise
  pass and fail later, inside training). JPEG/PNG files already in RGB are then kept byte for byte;
  greyscale, CMYK, palette or RGBA files (a few exist in ADE20K and in users' folders) are converted to RGB
  and re-encoded as PNG so every stored image decodes to `[H, W, 3]`.

  Args:
    data: the encoded image.
    name: the file name, for errors.

  Raises:
    BadFileError: naming `name`, for an empty, truncated or undecodable file.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      size = (image.height, image.width)
      if image.format in ('JPEG', 'PNG') and image.mode == 'RGB':
        return data, size
      rgb = np.array(image.convert('RGB'))
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files.
    raise BadFileError(name, describe_decode_error(data, e)) from e
  return encode_png(rgb), size


def check_mask_values(mask: np.ndarray, num_classes: int, name: str, ignore_label: int = IGNORE_LABEL):
  """Raises BadFileError unless every mask value is a class id in [0, num_classes) or `ignore_label`."""
  counts = np.bincount(mask.ravel(), minlength=256)
  counts[:num_classes] = 0
  counts[ignore_label] = 0
  bad = np.flatnonzero(counts)
  if bad.size:
    raise BadFileError(name, f'holds values {bad.tolist()} outside the class ids 0..{num_classes - 1} and '
                       f'the ignore label {ignore_label}.')


def check_same_size(image_size: tuple[int, int], mask: np.ndarray, image_name: str, mask_name: str):
  """Raises BadFileError (naming the mask) when an image and its mask differ in size."""
  if tuple(mask.shape[:2]) != tuple(image_size):
    raise BadFileError(mask_name, f'is {mask.shape[0]}x{mask.shape[1]} but its image {image_name} is '
                       f'{image_size[0]}x{image_size[1]}.')


def read_pair(image_tree: archives.FileTree, image_relpath: str, mask_tree: archives.FileTree,
              mask_relpath: str, *, num_classes: Optional[int] = None, ignore_label: int = IGNORE_LABEL,
              mask_decoder: Callable[[bytes, str], np.ndarray] = decode_mask) -> tuple[bytes, np.ndarray]:
  """Reads, fully decodes and checks one image and its mask.

  Args:
    image_tree, image_relpath: where the image is.
    mask_tree, mask_relpath: where the mask is.
    num_classes: when given, mask values must be in [0, num_classes) or `ignore_label`.
    ignore_label: the mask value of unlabelled pixels.
    mask_decoder: `(bytes, location) -> uint8 [H, W]` class indices (`decode_mask`, or a dataset's own).

  Returns:
    `(image bytes as `normalize_image` returns them, uint8 [H, W] mask)`.

  Raises:
    BadFilesError: naming the image, the mask or both, each with its reason.
  """
  problems = {}
  image_location, mask_location = image_tree.location(image_relpath), mask_tree.location(mask_relpath)
  image_bytes = size = mask = None
  try:
    image_bytes, size = normalize_image(read_file(image_tree, image_relpath), image_location)
  except BadFileError as e:
    problems[e.location] = e.reason
  try:
    mask = mask_decoder(read_file(mask_tree, mask_relpath), mask_location)
  except BadFileError as e:
    problems[e.location] = e.reason
  if not problems:
    try:
      check_same_size(size, mask, image_location, mask_location)
      if num_classes is not None:
        check_mask_values(mask, num_classes, mask_location, ignore_label)
    except BadFileError as e:
      problems[e.location] = e.reason
  if problems:
    raise BadFilesError(problems)
  return image_bytes, mask


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
    self._bad_files: dict[str, str] = {}
    super().__init__(**kwargs)

  def _download_and_prepare(self, dl_manager, download_config):
    """Generates every split, then raises one BadFilesError naming every bad source file, if any."""
    self._bad_files = {}
    try:
      super()._download_and_prepare(dl_manager, download_config)
    except Exception as e:
      if self._bad_files:  # e.g. TFDS refusing a split whose every example was bad: name the files.
        raise BadFilesError(self._bad_files, self.name) from e
      raise
    if self._bad_files:
      raise BadFilesError(self._bad_files, self.name)

  def _read_pair(self, image_tree: archives.FileTree, image_relpath: str, mask_tree: archives.FileTree,
                 mask_relpath: str, **kwargs) -> Optional[tuple[bytes, np.ndarray]]:
    """`read_pair(...)`, or None after recording the bad files (reported together at the end)."""
    try:
      return read_pair(image_tree, image_relpath, mask_tree, mask_relpath, **kwargs)
    except BadFilesError as e:
      for location, reason in e.problems.items():
        self._bad_files.setdefault(location, reason)
      return None

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
