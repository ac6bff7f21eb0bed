"""PASCAL VOC 2012 semantic segmentation, with the SBD `train_aug` split (TFDS builder, manual download).

TFDS's own `voc` has no segmentation masks, hence this builder. Manual directory contents:
  VOCtrainval_11-May-2012.tar   or its extracted  VOCdevkit/VOC2012/
  benchmark.tgz (SBD)           or its extracted  benchmark_RELEASE/dataset/   (builder config 'with_sbd')
Splits: 'train' (1464), 'val' (1449), 'trainval' (2913) from `ImageSets/Segmentation/{train,val}.txt`, and
with SBD 'train_aug' (10582): the VOC train ids plus every SBD train/val id, minus the VOC val ids.
Images come from `JPEGImages/<id>.jpg` (every SBD image is among them). Labels come from the official
`SegmentationClass/<id>.png` palette masks (values 0..20, 255 on object borders and void) where VOC has one,
otherwise from SBD's `cls/<id>.mat` (struct GTcls.Segmentation, values 0..20, no borders).
"""
import io

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from deeplab_jax.datasets import archives
from deeplab_jax.datasets import common

VOC_URL = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar'
SBD_URL = ('http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/'
           'benchmark.tgz')
VOC_ARCHIVE = 'VOCtrainval_11-May-2012.tar'
VOC_FOLDER = 'VOCdevkit/VOC2012'
SBD_ARCHIVE = 'benchmark.tgz'
SBD_FOLDER = 'benchmark_RELEASE/dataset'

CLASS_NAMES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
               'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
               'sheep', 'sofa', 'train', 'tvmonitor')
# Official sizes, checked whenever the full official lists are present.
SPLIT_SIZES = {'train': 1464, 'val': 1449, 'trainval': 2913, 'train_aug': 10582}
SBD_SIZES = {'train': 8498, 'val': 2857}


def read_sbd_mat(data: bytes, name: str) -> np.ndarray:
  """SBD's `cls/<id>.mat` -> uint8 `[H, W]` class indices (GTcls.Segmentation).

  Raises:
    common.BadFileError: naming `name`, for an empty, damaged or foreign .mat file.
  """
  if not data:
    raise common.BadFileError(name, 'empty file (0 bytes)')
  try:
    mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
  except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, ... for damaged files.
    raise common.BadFileError(name, f'cannot be read as a MATLAB file ({type(e).__name__}: '
                              f'{" ".join(str(e).split())})') from e
  if 'GTcls' not in mat:
    raise common.BadFileError(name, 'has no GTcls struct; is it an SBD cls/*.mat file?')
  try:
    return np.asarray(mat['GTcls'].Segmentation, dtype=np.uint8)
  except (AttributeError, TypeError, ValueError) as e:
    raise common.BadFileError(name, f'has no uint8 GTcls.Segmentation array ({e})') from e


def _read_ids(tree: archives.FileTree, relpath: str) -> list[str]:
  return [line.strip() for line in tree.read(relpath).decode().splitlines() if line.strip()]


class Voc2012Segmentation(common.SegmentationBuilder, skip_registration=True):
  """PASCAL VOC 2012 segmentation (21 classes, 255 = void) with the SBD train_aug split."""

  name = 'voc2012_segmentation'
  CLASS_NAMES = CLASS_NAMES
  HOMEPAGE = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='with_sbd', description='train, val, trainval and SBD train_aug.'),
      tfds.core.BuilderConfig(name='voc_only', description='train, val and trainval; no SBD needed.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put {VOC_ARCHIVE} (from {VOC_URL}) and, for train_aug, SBD's {SBD_ARCHIVE} (from {SBD_URL}) in the
  manual directory (config.dataset.manual_dir), as archives or extracted ({VOC_FOLDER}/, {SBD_FOLDER}/).
  """

  def _open_sources(self):
    manual = self.manual_path()
    with_sbd = self.builder_config.name == 'with_sbd'
    voc = archives.open_tree(manual, VOC_ARCHIVE, VOC_FOLDER, VOC_FOLDER + '/')
    sbd = None
    if with_sbd:
      sbd = archives.open_tree(manual, SBD_ARCHIVE, SBD_FOLDER, SBD_FOLDER + '/',
                               keep=lambda p: p.startswith('cls/') or p in ('train.txt', 'val.txt'))
    missing = []
    if voc is None:
      missing.append((f'{manual}/{VOC_ARCHIVE}', f'the extracted folder {manual}/{VOC_FOLDER}/', VOC_URL))
    if with_sbd and sbd is None:
      missing.append((f'{manual}/{SBD_ARCHIVE}', f'the extracted folder {manual}/{SBD_FOLDER}/', SBD_URL))
    if missing:
      hint = ("SBD is only needed for the 'train_aug' split: set config.dataset.builder_config = 'voc_only' "
              'to build train/val/trainval without it.') if with_sbd else ''
      raise common.ManualDownloadError(common.describe_missing(self.name, manual, missing, hint))
    return voc, sbd

  def _require(self, tree: archives.FileTree, relpaths: list[str], url: str):
    """Raises naming each absent file: the download is incomplete."""
    absent = [p for p in relpaths if not tree.exists(p)]
    if absent:
      raise common.ManualDownloadError(
          f"Dataset '{self.name}': the download at {tree.description} is incomplete; {len(absent)} expected "
          f'files are missing: {common.list_examples(tree.location(p) for p in absent)}. '
          f'Re-download it from {url}.')

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from the manual directory.
    voc, sbd = self._open_sources()
    lists = {s: f'ImageSets/Segmentation/{s}.txt' for s in ('train', 'val')}
    self._require(voc, list(lists.values()), VOC_URL)
    ids = {s: _read_ids(voc, p) for s, p in lists.items()}
    ids['trainval'] = sorted(set(ids['train']) | set(ids['val']))
    voc_ids = ids['trainval']
    self._require(voc, [f'JPEGImages/{i}.jpg' for i in voc_ids] +
                  [f'SegmentationClass/{i}.png' for i in voc_ids], VOC_URL)
    label_source = {i: 'voc' for i in voc_ids}
    if sbd is not None:
      self._require(sbd, ['train.txt', 'val.txt'], SBD_URL)
      sbd_lists = {s: _read_ids(sbd, f'{s}.txt') for s in ('train', 'val')}
      sbd_ids = set(sbd_lists['train']) | set(sbd_lists['val'])
      extra = sorted(sbd_ids - set(voc_ids))
      self._require(sbd, [f'cls/{i}.mat' for i in extra], SBD_URL)
      self._require(voc, [f'JPEGImages/{i}.jpg' for i in extra], VOC_URL)
      label_source.update({i: 'sbd' for i in extra})
      ids['train_aug'] = sorted((set(ids['train']) | sbd_ids) - set(ids['val']))
      full_sbd = all(len(sbd_lists[s]) == n for s, n in SBD_SIZES.items())
    else:
      full_sbd = False
    self._check_official_sizes(ids, full_sbd)
    return {split: self._generate_examples(voc, sbd, split_ids, label_source)
            for split, split_ids in ids.items()}

  def _check_official_sizes(self, ids: dict[str, list[str]], full_sbd: bool):
    """With the full official lists, every split must have its published size."""
    if len(ids['train']) != SPLIT_SIZES['train'] or len(ids['val']) != SPLIT_SIZES['val']:
      return  # A reduced devkit (tests, subsets): the sizes are whatever its lists say.
    checked = ['train', 'val', 'trainval'] + (['train_aug'] if full_sbd else [])
    wrong = {s: len(ids[s]) for s in checked if len(ids[s]) != SPLIT_SIZES[s]}
    if wrong:
      raise ValueError(f'VOC split sizes {wrong} differ from the official {SPLIT_SIZES}: the lists are modified.')

  def _generate_examples(self, voc, sbd, split_ids, label_source):
    for image_id in split_ids:
      if label_source[image_id] == 'voc':
        mask_tree, mask_name, decoder = voc, f'SegmentationClass/{image_id}.png', common.decode_mask
      else:
        mask_tree, mask_name, decoder = sbd, f'cls/{image_id}.mat', read_sbd_mat
      pair = self._read_pair(voc, f'JPEGImages/{image_id}.jpg', mask_tree, mask_name,
                             num_classes=len(CLASS_NAMES), mask_decoder=decoder)
      if pair is not None:
        yield image_id, self.make_example(*pair, image_id)
