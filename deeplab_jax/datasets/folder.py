"""Users' own data: a folder of images and class-index masks, as a TFDS builder.

Layout under `config.dataset.manual_dir`, one sub-folder per split (e.g. train/, val/):
  <split>/images/<name>.jpg|.jpeg|.png     RGB (greyscale/RGBA/CMYK are converted to RGB)
  <split>/masks/<name>.png                 class indices: palette ('P') or 8-bit grey ('L') PNG,
                                           values in [0, num_classes) or the ignore label
`num_classes`, `ignore_label` and `class_names` come from `config.dataset`. The prepared copy is keyed by
a fingerprint of the folder (every file's path, size and modification time) and of those settings, so
editing the folder or the settings builds a fresh copy instead of reading a stale one.
"""
import dataclasses
import hashlib
import os
import re

import tensorflow_datasets as tfds

from deeplab_jax.datasets import archives
from deeplab_jax.datasets import common

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
LAYOUT = ('<root>/<split>/images/<name>.jpg|.jpeg|.png and <root>/<split>/masks/<name>.png '
          '(class-index PNGs), with one <split> folder per split, e.g. train/ and val/')


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  root: str = ''
  num_classes: int = 2
  ignore_label: int = 255
  class_names: tuple[str, ...] = ()


def _split_dirs(root: str) -> list[str]:
  return sorted(d for d in os.listdir(root)
                if os.path.isdir(os.path.join(root, d, 'images')) and os.path.isdir(os.path.join(root, d, 'masks')))


def make_config(root: str, num_classes: int, ignore_label: int, class_names: tuple[str, ...]) -> FolderConfig:
  """The builder config for `root`, named after the folder and a fingerprint of its content."""
  root = os.path.abspath(root)
  if not os.path.isdir(root) or not _split_dirs(root):
    raise common.ManualDownloadError(
        f"Dataset 'folder' expects config.dataset.manual_dir = {root or repr('')} to hold {LAYOUT}; "
        'no such split folder was found.')
  if not 0 <= ignore_label <= 255 or not 1 <= num_classes <= 255:
    raise ValueError(f'folder dataset: config.dataset.num_classes must be in 1..255 and ignore_label in '
                     f'0..255 (masks are 8-bit); got {num_classes} and {ignore_label}.')
  if class_names and len(class_names) != num_classes:
    raise ValueError(f'config.dataset.class_names has {len(class_names)} names for num_classes={num_classes}.')
  digest = hashlib.sha1(repr((num_classes, ignore_label, tuple(class_names))).encode())
  for split in _split_dirs(root):
    for folder in ('images', 'masks'):
      path = os.path.join(root, split, folder)
      for name in sorted(os.listdir(path)):
        stat = os.stat(os.path.join(path, name))
        digest.update(f'{split}/{folder}/{name}:{stat.st_size}:{stat.st_mtime_ns};'.encode())
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(root).lower()).strip('_') or 'root'
  return FolderConfig(name=f'{slug}_{digest.hexdigest()[:12]}', root=root, num_classes=num_classes,
                      ignore_label=ignore_label, class_names=tuple(class_names))


class FolderDataset(common.SegmentationBuilder, skip_registration=True):
  """Images with class-index masks from a user's folder."""

  name = 'folder'

  @property
  def class_names(self) -> tuple[str, ...]:
    cfg = self.builder_config
    return tuple(cfg.class_names) or tuple(f'class_{i}' for i in range(cfg.num_classes))

  @property
  def ignore_label(self) -> int:
    return self.builder_config.ignore_label

  def _split_generators(self, dl_manager):
    del dl_manager  # The data is the user's folder.
    root = self.builder_config.root
    return {split: self._generate_examples(os.path.join(root, split)) for split in _split_dirs(root)}

  def _generate_examples(self, split_dir):
    tree = archives.DirTree(split_dir)
    pairs, orphans = [], []
    for path in tree.files():
      if path.startswith('images/') and path.lower().endswith(IMAGE_EXTENSIONS):
        stem = os.path.splitext(path[len('images/'):])[0]
        mask = f'masks/{stem}.png'
        (pairs if tree.exists(mask) else orphans).append((path, mask))
    if orphans or not pairs:
      raise common.ManualDownloadError(
          f'folder dataset {split_dir}: {len(orphans)} images have no mask'
          + (f' ({common.list_examples(tree.location(m) for _, m in orphans)})' if orphans else '')
          + ('' if pairs else '; no image/mask pairs found') + f'. Expected layout: {LAYOUT}.')
    cfg = self.builder_config
    for image_name, mask_name in pairs:
      pair = self._read_pair(tree, image_name, tree, mask_name, num_classes=cfg.num_classes,
                             ignore_label=cfg.ignore_label)
      if pair is not None:
        key = image_name[len('images/'):]
        yield key, self.make_example(*pair, os.path.splitext(key)[0])
