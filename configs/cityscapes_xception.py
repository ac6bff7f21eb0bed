"""DeepLabV3+ Xception-65 on Cityscapes fine (19 train ids, 255 ignored; model zoo `xception65_cityscapes`).

Crop 769x769, 90k steps, batch 8, poly lr 0.01, OS16; evaluation on whole 1024x2048 images (crop 1025x2049).
"""
from deeplab_jax.config_files import sibling

default = sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  config.model.num_classes = 19
  config.dataset.name = 'cityscapes'
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'val'
  config.dataset.num_classes = 19
  config.train.crop_size = (769, 769)
  config.train.batch_size = 8
  config.train.base_learning_rate = 0.01
  config.train.num_steps = 90_000
  config.eval.crop_size = (1025, 2049)
  config.eval.batch_size = 1
  return config
