"""DeepLabV3+ Xception-71 on PASCAL VOC 2012 (same protocol as voc_xception, deeper entry flow)."""
from deeplab_jax.config_files import sibling

default = sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  config.model.backbone = 'xception_71'
  return config
