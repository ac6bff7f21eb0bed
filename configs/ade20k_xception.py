"""DeepLabV3+ Xception-65 on ADE20K (150 classes + 0 ignored = 151 logits; model zoo `xception65_ade20k_train`).

Official g3doc recipe: crop 513, batch 4, 150k steps, OS16, BatchNorm frozen (fine_tune_batch_norm=False),
label 0 ('other') ignored.
"""
from deeplab_jax.config_files import sibling

default = sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  config.model.num_classes = 151
  config.model.fine_tune_batch_norm = False
  config.dataset.name = 'ade20k'
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'val'
  config.dataset.num_classes = 151
  config.dataset.ignore_label = 0
  config.train.batch_size = 4
  config.train.num_steps = 150_000
  config.train.base_learning_rate = 0.01
  return config
