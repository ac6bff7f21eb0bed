"""Cityscapes fine annotations with the 19 training classes (TFDS builder, manual download).

Manual directory contents (from https://www.cityscapes-dataset.com/, login required):
  leftImg8bit_trainvaltest.zip   or its extracted  leftImg8bit/
  gtFine_trainvaltest.zip        or its extracted  gtFine/
Splits 'train' (2975) and 'val' (500); the test split has no public labels. Masks are stored with the 19
train ids (0..18) and 255 for every other label id, mapped from the 34 ids of `*_gtFine_labelIds.png` as in
cityscapesScripts' `labels.py`.
"""
import numpy as np

from deeplab_jax.datasets import archives
from deeplab_jax.datasets import common

URL = 'https://www.cityscapes-dataset.com/'
IMAGE_ARCHIVE = 'leftImg8bit_trainvaltest.zip'
LABEL_ARCHIVE = 'gtFine_trainvaltest.zip'
SPLIT_SIZES = {'train': 2975, 'val': 500}
CLASS_NAMES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
               'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
               'motorcycle', 'bicycle')
# Label id -> train id for ids 0..33 (cityscapesScripts labels.py); everything else is ignored.
_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                   25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Maps uint8 `[H, W]` Cityscapes label ids to train ids (0..18, 255 ignore)."""
  table = np.full(256, common.IGNORE_LABEL, np.uint8)
  for label_id, train_id in _ID_TO_TRAIN_ID.items():
    table[label_id] = train_id
  return table[label_ids]


def _decode_train_ids(data: bytes, name: str) -> np.ndarray:
  """A `*_gtFine_labelIds.png` -> uint8 `[H, W]` train ids."""
  return label_ids_to_train_ids(common.decode_mask(data, name))


class Cityscapes(common.SegmentationBuilder, skip_registration=True):
  """Cityscapes fine annotations, 19 train ids, 255 = ignore."""

  name = 'cityscapes'
  CLASS_NAMES = CLASS_NAMES
  HOMEPAGE = URL
  SPLIT_SIZES = SPLIT_SIZES
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f'Put {IMAGE_ARCHIVE} and {LABEL_ARCHIVE} from {URL} (or their extracted '
                                  'leftImg8bit/ and gtFine/ folders) in the manual directory.')

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from the manual directory.
    manual = self.manual_path()
    images = archives.open_tree(manual, IMAGE_ARCHIVE, 'leftImg8bit', 'leftImg8bit/')
    labels = archives.open_tree(manual, LABEL_ARCHIVE, 'gtFine', 'gtFine/')
    missing = []
    if images is None:
      missing.append((f'{manual}/{IMAGE_ARCHIVE}', f'the extracted folder {manual}/leftImg8bit/', URL))
    if labels is None:
      missing.append((f'{manual}/{LABEL_ARCHIVE}', f'the extracted folder {manual}/gtFine/', URL))
    if missing:
      raise common.ManualDownloadError(common.describe_missing(self.name, manual, missing))
    splits = {}
    for split, size in self.SPLIT_SIZES.items():
      stems = sorted(p[:-len('_leftImg8bit.png')] for p in images.files()
                     if p.startswith(f'{split}/') and p.endswith('_leftImg8bit.png'))
      common.check_split_complete(self.name, split, stems, size, f'in {images.description}', labels,
                                  lambda stem: f'{stem}_gtFine_labelIds.png', 'label files',
                                  f'get {IMAGE_ARCHIVE} and {LABEL_ARCHIVE} again from {URL}.')
      splits[split] = self._generate_examples(images, labels, stems)
    return splits

  def _generate_examples(self, images, labels, stems):
    for stem in stems:
      pair = self._read_pair(images, f'{stem}_leftImg8bit.png', labels, f'{stem}_gtFine_labelIds.png',
                             mask_decoder=_decode_train_ids)
      if pair is not None:
        image_id = stem.split('/')[-1]
        yield image_id, self.make_example(*pair, image_id)
