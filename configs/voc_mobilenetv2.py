"""DeepLabV3 MobileNetV2 on PASCAL VOC 2012 (model zoo `mobilenetv2_coco_voc_trainaug`).

Head: image pooling + 1x1 branch only, no atrous branches, no decoder. Depth multiplier from the config
argument: `--config=configs/voc_mobilenetv2.py:0.5` for the dm0.5 model (default 1.0).
"""
from deeplab_jax.config_files import sibling

default = sibling(__file__, 'default')


def get_config(depth_multiplier: str = '1.0'):
  config = default.get_config()
  m = config.model
  m.backbone = 'mobilenet_v2'
  m.depth_multiplier = float(depth_multiplier)
  m.atrous_rates = ()
  m.aspp_with_separable_conv = False
  m.decoder_output_stride = 0
  return config
