"""DeepLab-v2 ResNet-101 on PASCAL VOC 2012 (Chen et al., TPAMI 2017): ASPP-L at rates 6/12/18/24.

The original ResNet-101 (7x7 stem, ImageNet-mean inputs), output stride 8, four 3x3 atrous branches each
predicting the classes, summed. Caffe protocol: batch 10, crop 321, lr 2.5e-4 poly 0.9, 20k steps, weight
decay 5e-4, BatchNorm frozen. Evaluation applies the paper's fully-connected CRF (w1=4, theta_alpha=67,
theta_beta=3, w2=3, theta_gamma=1, 10 iterations; `--config.eval.crf.enabled=False` for the network alone).
"""
from deeplab_jax.config_files import sibling

default = sibling(__file__, 'default')


def get_config():
  config = default.get_config()
  m = config.model
  m.backbone = 'resnet_v1_101'
  m.head = 'aspp_l'
  m.output_stride = 8
  m.atrous_rates = (6, 12, 18, 24)
  m.aspp_l_hidden = 0
  m.decoder_output_stride = 0
  m.dropout_rate = 0.5
  m.fine_tune_batch_norm = False
  config.train.batch_size = 10
  config.train.crop_size = (321, 321)
  config.train.base_learning_rate = 2.5e-4
  config.train.weight_decay = 5e-4
  config.train.num_steps = 20_000
  config.eval.output_stride = 8
  crf = config.eval.crf
  crf.enabled = True
  crf.w1, crf.theta_alpha, crf.theta_beta, crf.w2, crf.theta_gamma = 4.0, 67.0, 3.0, 3.0, 1.0
  return config
