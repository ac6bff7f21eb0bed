"""A tiny DeepLabV3+ (MobileNetV2 x0.25, 16-channel heads) for tests and laptop smoke runs.

It keeps every part of the full model (image pooling, separable atrous ASPP, decoder at stride 4) at a
size that compiles and steps in seconds on a CPU.
"""
from deeplab_jax.config_files import sibling

default = sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  m = config.model
  m.backbone = 'mobilenet_v2'
  m.depth_multiplier = 0.25
  m.atrous_rates = (1, 2)
  m.aspp_filters = 16
  m.decoder_filters = 16
  m.decoder_output_stride = 4
  m.num_classes = 5
  config.dataset.name = 'synthetic_scenes'
  config.dataset.num_classes = 5
  config.dataset.train_split = 'train'  # synthetic_scenes has train and val
  config.dataset.eval_split = 'val'
  config.train.batch_size = 8
  config.train.crop_size = (33, 33)
  config.train.num_steps = 4
  config.eval.crop_size = (33, 33)
  config.eval.batch_size = 8
  return config
