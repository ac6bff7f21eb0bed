"""Segmentation datasets as TFDS builders, written as `array_record` files and read without TensorFlow.

`get_builder(config.dataset)` returns the builder for `config.dataset.name`:
  voc2012_segmentation   PASCAL VOC 2012 + SBD train_aug (manual: VOCtrainval_11-May-2012.tar, benchmark.tgz)
  cityscapes             Cityscapes fine, 19 train ids (manual: leftImg8bit/gtFine_trainvaltest.zip)
  ade20k                 ADE20K SceneParsing, 150 classes (manual: ADEChallengeData2016.zip)
  folder                 the user's <split>/images + <split>/masks folders (manual_dir is the root)
  synthetic_scenes       procedural scenes with exact masks (generated; nothing to download)
Then `builder.download_and_prepare()` writes the files (once) and `builder.as_data_source(split)` gives
random access to examples {'image': uint8 [H, W, 3], 'label': uint8 [H, W, 1], 'image_id': bytes}.
"""
import ml_collections

from deeplab_jax.datasets import ade20k
from deeplab_jax.datasets import cityscapes
from deeplab_jax.datasets import common
from deeplab_jax.datasets import folder
from deeplab_jax.datasets import synthetic
from deeplab_jax.datasets import voc
from deeplab_jax.datasets.common import BadFilesError
from deeplab_jax.datasets.common import ManualDownloadError

DATASET_NAMES = ('voc2012_segmentation', 'cityscapes', 'ade20k', 'folder', 'synthetic_scenes')


def get_builder(dataset_config: ml_collections.ConfigDict) -> common.SegmentationBuilder:
  """Returns the (not yet prepared) TFDS builder that `dataset_config` names.

  Args:
    dataset_config: `config.dataset`; reads name, data_dir, manual_dir, builder_config, num_classes,
      ignore_label, class_names and the synthetic_* fields.

  Raises:
    ValueError: for an unknown name or settings a dataset cannot honour.
  """
  name = dataset_config.name
  kwargs = {'data_dir': dataset_config.data_dir or None, 'manual_dir': dataset_config.manual_dir or None}
  variant = dataset_config.get('builder_config', '')
  if name == 'voc2012_segmentation':
    allowed = [c.name for c in voc.Voc2012Segmentation.BUILDER_CONFIGS]
    if variant and variant not in allowed:
      raise ValueError(f'config.dataset.builder_config={variant!r} is not one of {allowed} for {name}.')
    return voc.Voc2012Segmentation(config=variant or 'with_sbd', **kwargs)
  if variant:
    raise ValueError(f"config.dataset.builder_config is only used by voc2012_segmentation; set it to '' "
                     f'for {name!r}.')
  if name == 'cityscapes':
    return cityscapes.Cityscapes(**kwargs)
  if name == 'ade20k':
    return ade20k.Ade20k(**kwargs)
  if name == 'folder':
    if not dataset_config.manual_dir:
      raise ValueError("Dataset 'folder' reads config.dataset.manual_dir, which is empty; set it to the folder "
                       f'holding {folder.LAYOUT}.')
    config = folder.make_config(dataset_config.manual_dir, dataset_config.num_classes,
                                dataset_config.ignore_label, tuple(dataset_config.class_names))
    return folder.FolderDataset(config=config, **kwargs)
  if name == 'synthetic_scenes':
    config = synthetic.make_config(
        image_size=dataset_config.synthetic_image_size, num_classes=dataset_config.num_classes,
        num_train=dataset_config.synthetic_num_train, num_val=dataset_config.synthetic_num_val,
        seed=dataset_config.synthetic_seed, max_objects=dataset_config.synthetic_max_objects)
    if not 2 <= config.num_classes <= synthetic.MAX_CLASSES:
      raise ValueError(f'config.dataset.num_classes={config.num_classes} must be in 2..{synthetic.MAX_CLASSES} '
                       'for synthetic_scenes.')
    # TFDS refuses a custom config object named like a predefined one: pass the predefined one by name.
    predefined = {c.name for c in synthetic.SyntheticScenes.BUILDER_CONFIGS}
    return synthetic.SyntheticScenes(config=config.name if config.name in predefined else config, **kwargs)
  raise ValueError(f'Unknown config.dataset.name {name!r}; allowed: {", ".join(DATASET_NAMES)}.')


def class_names(dataset_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The class names of `config.dataset` without preparing (or having) the data.

  `config.dataset.class_names`, when set, wins; otherwise the dataset's own names (for `folder`:
  `class_0`, `class_1`, ...). Prediction uses this to label a checkpoint's classes.

  Raises:
    ValueError: for an unknown dataset name, or names that disagree with `num_classes`.
  """
  names = tuple(dataset_config.get('class_names', ()) or ())
  num_classes = int(dataset_config.num_classes)
  if not names:
    name = dataset_config.name
    if name == 'voc2012_segmentation':
      names = voc.CLASS_NAMES
    elif name == 'cityscapes':
      names = cityscapes.CLASS_NAMES
    elif name == 'ade20k':
      names = ade20k.CLASS_NAMES
    elif name == 'folder':
      names = tuple(f'class_{i}' for i in range(num_classes))
    elif name == 'synthetic_scenes':
      names = synthetic.class_names(num_classes)
    else:
      raise ValueError(f'Unknown config.dataset.name {name!r}; allowed: {", ".join(DATASET_NAMES)}.')
  if len(names) != num_classes:
    raise ValueError(f'config.dataset.num_classes={num_classes} but {dataset_config.name!r} has '
                     f'{len(names)} class names.')
  return tuple(str(n) for n in names)


__all__ = ['BadFilesError', 'DATASET_NAMES', 'ManualDownloadError', 'class_names', 'get_builder']
