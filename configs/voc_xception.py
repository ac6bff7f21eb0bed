"""DeepLabV3+ Xception-65 on PASCAL VOC 2012 (official recipe; model zoo `xception65_coco_voc_trainaug`).

train_aug (10582 images), crop 513, batch 16, poly lr 0.007, 30k steps, OS16 (rates 6/12/18), decoder at
stride 4, separable ASPP and decoder, BN decay 0.9997, weight decay 4e-5. Evaluate at OS8 with
`--config.eval.output_stride=8` (rates become 12/24/36) and multi-scale with `--config.eval.scales=...`.
"""
from deeplab_jax.config_files import sibling

default = sibling(__file__, 'default')


def get_config():
  return default.get_config()
