"""Default DeepLab configuration: DeepLabV3+ Xception-65 on PASCAL VOC 2012 (official recipe).

Every recipe file imports this one and overrides what differs. Fields:
  model:    architecture only; `deeplab_jax.models.create_model(config.model)` reads nothing else.
  dataset:  which data, where, how many classes, the ignore label.
  train:    the official training protocol (crop, batch, poly schedule, augmentation).
  eval:     evaluation protocol (eval crop, output stride, scales, flip).
"""
import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
  """DeepLabV3+ with aligned Xception-65, separable ASPP and decoder (model zoo `xception65_coco_voc`)."""
  m = ml_collections.ConfigDict()
  m.backbone = 'xception_65'       # xception_{41,65,71}, resnet_v1_{50,101}[_beta], mobilenet_v2, vgg_16
  m.head = 'aspp'                  # 'aspp' (V3/V3+), 'largefov' (V1), 'aspp_l' (V2)
  m.num_classes = 21
  m.output_stride = 16             # 8, 16 or 32: changes atrous rates, never parameters
  m.atrous_rates = (6, 12, 18)     # ASPP rates at `output_stride`; scaled when eval OS differs
  m.multi_grid = (1, 1, 1)         # unit rates of the last backbone block
  m.depth_multiplier = 1.0         # MobileNetV2 only
  m.aspp_with_separable_conv = True
  m.aspp_with_image_pooling = True
  m.aspp_filters = 256
  m.decoder_output_stride = 4      # 0 = no decoder (DeepLabV3)
  m.decoder_use_separable_conv = True
  m.decoder_filters = 256
  m.logits_kernel_size = 1
  m.largefov_hidden = 1024         # V1/V2 VGG heads: fc6/fc7 width
  m.aspp_l_hidden = 1024           # V2 ASPP-L branch width (0: branches are direct 3x3 logits, as for ResNet)
  m.dropout_rate = 0.1             # after the ASPP projection (V3/V3+); V1/V2 heads use 0.5
  m.fine_tune_batch_norm = True    # False: BatchNorm stays in inference mode while training
  m.bn_decay = -1.0                # <0: the backbone's official value (Xception 0.9997, ResNet 0.95, MNv2 0.997)
  m.head_bn_decay = -1.0           # ASPP/decoder BatchNorm decay; <0: the official 0.9997 (for long runs)
  m.depthwise_impl = 'auto'        # 'auto' (shifted on CPU, grouped elsewhere), 'grouped', 'shifted'
  m.dtype = 'float32'              # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  m.remat = False                  # rematerialise backbone units in the backward pass to save memory
  return m


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = get_model_config()

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'voc2012_segmentation'
  config.dataset.data_dir = ''        # TFDS data dir ('' = TFDS default, ~/tensorflow_datasets)
  config.dataset.manual_dir = ''      # manual downloads ('folder': the data root; '' = <data_dir>/downloads/manual)
  config.dataset.train_split = 'train_aug'
  config.dataset.eval_split = 'val'
  config.dataset.num_classes = 21
  config.dataset.ignore_label = 255
  config.dataset.class_names = ()     # () = the dataset's own names
  config.dataset.builder_config = ''  # voc2012_segmentation: 'with_sbd' ('' = it; has train_aug) or 'voc_only'
  config.dataset.synthetic_image_size = 97   # synthetic_scenes: square image side
  config.dataset.synthetic_num_train = 1000  # synthetic_scenes: train split size
  config.dataset.synthetic_num_val = 200     # synthetic_scenes: held-out val split size
  config.dataset.synthetic_seed = 0          # synthetic_scenes: generator seed (scenes depend on it only)
  config.dataset.synthetic_max_objects = 5   # synthetic_scenes: at most this many objects per scene
  config.dataset.num_workers = 4      # input pipeline threads decoding/augmenting (0 = in the caller)
  config.dataset.prefetch_batches = 2  # batches prepared ahead of the trainer

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16
  config.train.crop_size = (513, 513)
  config.train.num_steps = 30_000
  config.train.base_learning_rate = 0.007
  config.train.learning_power = 0.9
  config.train.warmup_steps = 0
  config.train.warmup_start_learning_rate = 0.0  # linear warm-up starts here (official slow_start_learning_rate)
  config.train.momentum = 0.9
  config.train.weight_decay = 4e-5
  config.train.top_k_percent_pixels = 1.0
  config.train.min_scale = 0.5
  config.train.max_scale = 2.0
  config.train.scale_step = 0.25
  config.train.seed = 0
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 1000
  config.train.keep_checkpoints = 3
  config.train.eval_every_steps = 5000

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8
  config.eval.crop_size = (513, 513)
  config.eval.output_stride = 16
  config.eval.scales = (1.0,)
  config.eval.flip = False
  config.eval.num_images = -1         # -1 = the whole split
  config.eval.num_images_to_save = 4  # prediction overlays written as PNGs and TensorBoard images per eval
  # The fully-connected CRF of DeepLab V1/V2 on the averaged probabilities (deeplab_jax/crf.py). Defaults:
  # the DeepLab-v2 ResNet-101 values (w1, theta_alpha, theta_beta cross-validated on 100 VOC val images).
  config.eval.crf = ml_collections.ConfigDict()
  config.eval.crf.enabled = False
  config.eval.crf.w1 = 4.0            # bilateral (appearance) kernel weight
  config.eval.crf.theta_alpha = 67.0  # its spatial std, pixels
  config.eval.crf.theta_beta = 3.0    # its colour std, RGB levels
  config.eval.crf.w2 = 3.0            # Gaussian (smoothness) kernel weight
  config.eval.crf.theta_gamma = 1.0   # its spatial std, pixels
  config.eval.crf.num_iterations = 10

  config.init_from = ''               # checkpoint dir to fine-tune from
  config.init_from_scope = 'all'      # 'all' or 'backbone'
  config.init_from_min_fraction = 0.9  # stop unless this share of the in-scope variables loads
  return config
