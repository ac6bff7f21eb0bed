"""The VOC subset in shared/data as a VOCdevkit the VOC builder reads (shared by the benchmark scripts)."""
import pathlib


def voc_manual_dir(voc: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  """A VOCdevkit/VOC2012 view of the subset whose train and val lists are both its images."""
  devkit = root / 'manual' / 'VOCdevkit' / 'VOC2012'
  (devkit / 'ImageSets' / 'Segmentation').mkdir(parents=True, exist_ok=True)
  for name in ('JPEGImages', 'SegmentationClass'):
    if not (devkit / name).exists():
      (devkit / name).symlink_to(voc / name)
  ids = (voc / 'ImageSets' / 'Segmentation' / 'train.txt').read_text()
  for split in ('train', 'val'):
    (devkit / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text(ids)
  return root / 'manual'
