"""Model family tests: shapes and strides, parameter invariance, depthwise paths, resize, compile counts."""
import importlib
import re

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from deeplab_jax import flops
from deeplab_jax import train
from deeplab_jax.models import backbones
from deeplab_jax.models import create_model
from deeplab_jax.models import layers
from deeplab_jax.models import mobilenet_v2
from deeplab_jax.models import resnet
from deeplab_jax.models import xception

CONFIGS = ('voc_xception', 'voc_xception71', 'voc_resnet101_v3', 'voc_resnet101_v3plus',
           'voc_mobilenetv2', 'voc_vgg16_v1', 'voc_resnet101_v2', 'cityscapes_xception',
           'ade20k_xception', 'tiny')
# Channels of the stride-4 decoder end point, by backbone module.
LOW_LEVEL_CHANNELS = {xception.Xception: 256, resnet.ResNet: 256, mobilenet_v2.MobileNetV2: 144}


def get_config(name):
  return importlib.import_module(f'configs.{name}').get_config()


def abstract_apply(model, size, batch=1, small_logits=False):
  """(variables, logits, intermediates [+ 'logits_small']) as ShapeDtypeStructs: no compilation."""
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=['intermediates']), variables, images)
  inter = {k: v[0] for k, v in state['intermediates'].items()}
  if small_logits:  # a second trace of the whole model: only where it is checked
    inter['logits_small'] = jax.eval_shape(lambda v, x: model.apply(v, x, upsample=False), variables, images)
  return variables, logits, inter


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_builds_513_logits_and_params_do_not_depend_on_size_or_stride(name):
  config = get_config(name)
  model = create_model(config.model)
  variables, logits, _ = abstract_apply(model, 513)
  assert logits.shape == (1, 513, 513, config.model.num_classes)
  assert logits.dtype == jnp.float32
  shapes = jax.tree_util.tree_map(lambda x: x.shape, variables)
  other_size, _, _ = abstract_apply(model, 97)
  assert jax.tree_util.tree_map(lambda x: x.shape, other_size) == shapes
  for output_stride in (8, 16, 32):
    at_os, _, _ = abstract_apply(create_model(config.model, output_stride=output_stride), 97)
    assert jax.tree_util.tree_map(lambda x: x.shape, at_os) == shapes


@pytest.mark.parametrize('backbone', backbones.names())
@pytest.mark.parametrize('output_stride', (8, 16, 32))
def test_backbone_feature_shapes_and_strides(backbone, output_stride):
  m = default.get_model_config()
  m.backbone = backbone
  if backbone == 'vgg_16':
    m.decoder_output_stride = 0
  model = create_model(m, output_stride=output_stride)
  size = 65  # 16k+1: every stride-s map is (size - 1) / s + 1
  _, logits, inter = abstract_apply(model, size, small_logits=backbone != 'vgg_16')
  feat = (size - 1) // output_stride + 1
  channels = {'mobilenet_v2': 320, 'vgg_16': 512}.get(backbone, 2048)
  assert inter['backbone_features'].shape == (1, feat, feat, channels)
  assert logits.shape == (1, size, size, 21)
  if backbone != 'vgg_16':
    low = (size - 1) // 4 + 1
    assert inter['decoder_tap'].shape == (1, low, low, LOW_LEVEL_CHANNELS[backbones.get(backbone).module])
    assert inter['logits_small'].shape == (1, low, low, 21)
    assert model.logits_stride == 4


def test_published_parameter_counts():
  # Totals of the official graphs (variables.tsv sums in shared/data/official_tf_reference).
  variables, _, _ = abstract_apply(create_model(get_config('voc_xception').model), 129)
  assert count(variables) == 41_258_213
  assert count(abstract_apply(create_model(get_config('voc_resnet101_v3plus').model), 129)[0]) == \
      45_935_365
  m = get_config('voc_mobilenetv2').model
  assert count(abstract_apply(create_model(m), 129)[0]) == 2_146_645


def test_output_stride_override_scales_atrous_rates():
  m = get_config('voc_xception').model
  assert create_model(m).atrous_rates == (6, 12, 18)
  assert create_model(m, output_stride=8).atrous_rates == (12, 24, 36)
  assert create_model(m, output_stride=32).atrous_rates == (3, 6, 9)


@pytest.mark.parametrize('field,value', [('backbone', 'resnet_152'), ('head', 'fcn'),
                                         ('output_stride', 12), ('depthwise_impl', 'fast'),
                                         ('dtype', 'float16'), ('bn_decay', 1.0),
                                         ('head_bn_decay', 1.5)])
def test_bad_config_values_name_the_field(field, value):
  m = default.get_model_config()
  setattr(m, field, value)
  with pytest.raises(ValueError, match=f'config.model.{field}'):
    create_model(m)


@pytest.mark.parametrize('field,value,message', [
    ('largefov_hiden', 1024, 'unknown fields'),
    ('decoder_output_stride', 2, 'config.model.decoder_output_stride=2 is not one of'),
    ('multi_grid', (1, 2, 4), 'multi_grid=(1, 2, 4) does not apply to vgg_16'),
    ('depth_multiplier', 0.5, 'depth_multiplier=0.5 only applies to MobileNetV2'),
    ('head_bn_decay', 0.99, 'head_bn_decay=0.99 does not apply to the largefov head')])
def test_options_that_do_not_apply_are_rejected(field, value, message):
  m = get_config('voc_vgg16_v1').model if field in ('multi_grid', 'depth_multiplier', 'head_bn_decay') else \
      default.get_model_config()
  m[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    create_model(m)
  m = get_config('voc_vgg16_v1').model
  m.decoder_output_stride = 4
  with pytest.raises(ValueError, match='the largefov head has no decoder'):
    create_model(m)


def test_head_bn_decay_sets_the_aspp_and_decoder_batch_norms_only():
  """Each BatchNorm's decay as built (recorded while tracing a train-mode apply, no compilation)."""
  config = get_config('tiny')
  config.model.head_bn_decay = 0.9
  model = create_model(config.model)
  images = jax.ShapeDtypeStruct((2, 33, 33, 3), jnp.float32)
  decays = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      decays['/'.join(context.module.path)] = context.module.momentum
    return next_fun(*args, **kwargs)

  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                            rngs={'dropout': jax.random.key(1)}), variables, images)
  head = {path: decay for path, decay in decays.items() if path.startswith(('aspp/', 'decoder/'))}
  assert 4 <= len(head) < len(decays), sorted(decays)
  assert set(head.values()) == {0.9}
  assert {decay for path, decay in decays.items() if path not in head} == {model.spec.bn_decay}


def test_model_fields_are_the_config_fields():
  m = default.get_model_config()
  model = create_model(m)
  assert {f: getattr(model, f) for f in m} == {**m.to_dict(), 'atrous_rates': (6, 12, 18)}


def test_a_backbone_variant_is_one_registration(monkeypatch):
  """A new variant (ResNet-152-beta, slim's 3/8/36 units) needs only a spec: build, count, forward."""
  monkeypatch.setattr(backbones, '_REGISTRY', dict(backbones._REGISTRY))  # pylint: disable=protected-access
  resnet.register(152, (3, 8, 36), beta=True)
  config = get_config('voc_resnet101_v3plus')
  config.model.backbone = 'resnet_v1_152_beta'
  model = create_model(config.model)
  variables, logits, inter = abstract_apply(model, 65)
  assert logits.shape == (1, 65, 65, 21) and inter['decoder_tap'].shape == (1, 17, 17, 256)
  assert backbones.get('resnet_v1_152_beta').decoder_end_points == {
      4: 'block1/unit_2', 8: 'block2/unit_7', 16: 'block3/unit_35'}
  units = [k for k in variables['params']['resnet_v1_152'] if k.startswith('block')]
  assert len(units) == 3 + 8 + 36 + 3
  # ResNet-101 + 4 identity bottlenecks in block2 (1x1 512->128, 3x3, 1x1 128->512) at 65x65 (stride 8)
  # + 13 in block3 (1x1 1024->256, 3x3, 1x1 256->1024) at 33x33 (stride 16).
  block2_unit = (512 * 128 + 9 * 128 * 128 + 128 * 512) * 65 * 65
  block3_unit = (1024 * 256 + 9 * 256 * 256 + 256 * 1024) * 33 * 33
  counts = {name: flops.count_inference(get_config('voc_resnet101_v3plus') if name == '101' else config).total
            for name in ('101', '152')}
  assert counts['152'] - counts['101'] == 4 * block2_unit + 13 * block3_unit


def test_vgg_remat_gives_the_same_gradients():
  m = get_config('voc_vgg16_v1').model
  m.largefov_hidden = 8
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 33, 33, 3), maxval=255.0)
  plain = create_model(m)
  m.remat = True
  remat = create_model(m)
  variables = jax.jit(plain.init)(jax.random.PRNGKey(0), x)
  loss = lambda model: jax.jit(jax.grad(lambda p: jnp.mean(model.apply({'params': p}, x) ** 2)))
  jaxprs = [str(jax.make_jaxpr(jax.grad(lambda p, mdl=mdl: jnp.mean(mdl.apply({'params': p}, x))))(
      variables['params'])) for mdl in (plain, remat)]
  assert 'remat' not in jaxprs[0] and 'remat' in jaxprs[1]
  for a, b in zip(jax.tree_util.tree_leaves(loss(plain)(variables['params'])),
                  jax.tree_util.tree_leaves(loss(remat)(variables['params']))):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.max(jnp.abs(a))) + 1e-8)


def test_rejects_non_rgb_input():
  model = create_model(get_config('tiny').model)
  with pytest.raises(ValueError, match='B, H, W, 3'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 33, 33), jnp.float32))


class _Grouped(nn.Module):
  stride: int
  rate: int
  padding: str

  @nn.compact
  def __call__(self, x):
    return layers.depthwise_conv(x, 3, name='dw', stride=self.stride, rate=self.rate,
                                 padding=self.padding, impl='grouped')


class _Shifted(_Grouped):

  @nn.compact
  def __call__(self, x):
    return layers.depthwise_conv(x, 3, name='dw', stride=self.stride, rate=self.rate,
                                 padding=self.padding, impl='shifted')


@pytest.mark.parametrize('stride,rate,padding,size', [
    (1, 1, 'SAME', 9), (2, 1, 'SAME', 10), (2, 1, 'EXPLICIT', 10), (2, 1, 'EXPLICIT', 9),
    (1, 2, 'SAME', 9), (1, 4, 'SAME', 12), (2, 1, 'SAME', 9)])
def test_depthwise_implementations_agree_with_gradients(stride, rate, padding, size):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 5))
  grouped, shifted = _Grouped(stride, rate, padding), _Shifted(stride, rate, padding)
  params = grouped.init(jax.random.PRNGKey(1), x)
  assert jax.tree_util.tree_map(jnp.shape, shifted.init(jax.random.PRNGKey(1), x)) == \
      jax.tree_util.tree_map(jnp.shape, params)
  y_g, y_s = grouped.apply(params, x), shifted.apply(params, x)
  assert y_g.shape == y_s.shape
  np.testing.assert_allclose(y_s, y_g, atol=1e-5, rtol=1e-5)

  def loss(module, p, inp):
    return jnp.sum(jnp.sin(module.apply(p, inp)))

  g_g = jax.grad(lambda p, i: loss(grouped, p, i), argnums=(0, 1))(params, x)
  g_s = jax.grad(lambda p, i: loss(shifted, p, i), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_s), jax.tree_util.tree_leaves(g_g)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_depthwise_auto_is_shifted_on_cpu():
  assert jax.default_backend() == 'cpu'
  assert layers.resolve_depthwise_impl('auto') == 'shifted'
  assert layers.resolve_depthwise_impl('grouped') == 'grouped'


def test_residual_relu_is_relu_with_relus_gradient():
  x = jnp.asarray([-2.0, -0.5, 0.0, 0.5, 3.0, jnp.nan])
  np.testing.assert_array_equal(layers.residual_relu(x), nn.relu(x))
  grad = jax.grad(lambda v: jnp.sum(layers.residual_relu(v) * jnp.arange(1.0, 6.0)))(x[:5])
  np.testing.assert_array_equal(grad, jax.grad(lambda v: jnp.sum(nn.relu(v) * jnp.arange(1.0, 6.0)))(x[:5]))


def test_residual_units_outputs_are_computed_once():
  """A chain of ResNet units compiles to elementwise fusions that each read at most two unit-sized arrays.

  With `nn.relu` as the unit output XLA:CPU recomputed the earlier units' sums in each later unit's
  fusion (here one fusion read 7 unit-sized arrays), which cost ResNet-101 a fifth of its inference time.
  """
  class Chain(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(8):
        x, _ = resnet.Bottleneck(64, 16, 1, 1, False, layers.BNConfig(0.9, 1e-5), name=f'unit_{i}')(x)
      return x

  x = jnp.ones((1, 17, 17, 64))
  variables = Chain().init(jax.random.key(0), x)
  text = jax.jit(Chain().apply).lower(variables, x).compile().as_text()
  shapes = dict(re.findall(r'^\s*(%[\w.\-]+) = (\w+\[[\d,]*\])', text, re.M))
  unit_sized = {'f32[1,17,17,64]', 'f32[289,64]'}
  reads = [sum(shapes.get(name.strip()) in unit_sized for name in operands.split(','))
           for operands in re.findall(r'= \S+ fusion\((.*?)\), kind=kLoop', text)]
  assert reads, text[:2000]  # the compiled text still has loop fusions in this format
  assert max(reads) <= 2, reads


def _cpu_training_against_plain_batch_norm(monkeypatch, net, x, loss_of, compiler_options=None):
  """Train-mode `net` with CPU training's BatchNorm recomputations against plain `nn.BatchNorm`.

  Checks the same variables, loss and batch statistics; returns `(bytes, plain_bytes, grads, plain_grads)`
  with XLA's temporary bytes of each value-and-grad.
  """
  def run():
    variables = net.init(jax.random.key(1), x)

    def loss(params):
      out, state = net.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
      return loss_of(out), state

    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(variables['params']).compile(
        compiler_options)
    return variables, compiled(variables['params']), compiled.memory_analysis().temp_size_in_bytes

  assert layers.recompute_batch_norm()
  variables, ((loss, stats), grads), ours_bytes = run()
  monkeypatch.setattr(layers, 'recompute_batch_norm', lambda: False)
  plain_variables, ((plain_loss, plain_stats), plain_grads), plain_bytes = run()
  chex.assert_trees_all_equal(variables, plain_variables)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  chex.assert_trees_all_close(stats, plain_stats, rtol=1e-5, atol=1e-6)
  return ours_bytes, plain_bytes, grads, plain_grads


def test_training_batch_norm_on_cpu_recomputes_its_centred_input(monkeypatch):
  """On CPU a training BatchNorm recomputes `x - mean` in its backward pass instead of keeping a copy.

  Same variables, loss and gradients as plain `nn.BatchNorm`, and fewer XLA temporaries: differentiated
  plainly, XLA:CPU writes every BatchNorm's centred input in the forward pass and keeps it.
  """
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(4):
        x = layers.conv_bn(x, 32, 1, name=f'conv{i}', train=True, bn=layers.BNConfig(0.9, 1e-3))
      return x

  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 32)) * 3.0 + 1.0
  recomputed_bytes, plain_bytes, grads, plain_grads = _cpu_training_against_plain_batch_norm(
      monkeypatch, Net(), x, lambda y: jnp.mean(jnp.sin(y)))
  assert recomputed_bytes < 0.8 * plain_bytes, (recomputed_bytes, plain_bytes)
  chex.assert_trees_all_close(grads, plain_grads, rtol=1e-5, atol=1e-7)


def test_training_batch_norm_outputs_are_computed_by_the_next_conv_on_cpu(monkeypatch):
  """On CPU, a BatchNorm followed by a convolution is computed by that convolution (`layers.Normalized`).

  Xception units (strided conv shortcut, atrous sum unit, activations inside the separable convs, the
  decoder tap) give the same variables, loss, statistics and gradients as plain `nn.BatchNorm`, with fewer
  XLA temporaries under the train step's compiler options.
  """
  bn = layers.BNConfig(0.9, 1e-3)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x, tap = xception.XceptionModule((16, 16, 24), 'conv', False, 2, 1, (1, 1, 1), True, bn, name='u1')(x)
      x, _ = xception.XceptionModule((24, 24, 24), 'sum', False, 1, 2, (1, 2, 1), True, bn, name='u2')(x)
      x, _ = xception.XceptionModule((24, 24, 32), 'none', True, 1, 1, (1, 1, 1), True, bn, name='u3')(x)
      return x, tap

  x = jax.random.normal(jax.random.key(0), (2, 33, 33, 8)) * 3.0 + 1.0
  deferred_bytes, plain_bytes, grads, plain_grads = _cpu_training_against_plain_batch_norm(
      monkeypatch, Net(), x, lambda out: jnp.mean(jnp.sin(out[0])) + jnp.mean(out[1] ** 2),
      train.cpu_compiler_options(train.create_mesh(jax.devices()[:1])))
  # 1.64 MB vs 4.24 MB; recomputing the centred inputs only (no `defer`) gives 2.70 MB, without the
  # compiler options 4.08 MB.
  assert deferred_bytes < 0.5 * plain_bytes, (deferred_bytes, plain_bytes)
  # The same formulas summed in another order differ in the last bits: compared relative to the largest
  # gradient (some are zero up to rounding, e.g. a BatchNorm bias that only feeds another BatchNorm).
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(plain_grads))
  chex.assert_trees_all_close(grads, plain_grads, rtol=1e-5, atol=1e-6 * scale)


def test_normalized_computes_what_batch_norm_and_the_activation_return():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4)) * 2.0 + 0.5
  deferred = layers.BatchNormStatistics(0.9, 1e-3)
  plain = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  variables = plain.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, deferred.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
  out, state = deferred.apply(variables, x, mutable=['batch_stats'])
  want, want_state = plain.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(layers.activate(out, nn.relu).value(), nn.relu(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(layers.as_array(out), want, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(state, want_state, rtol=1e-6)
  with pytest.raises(ValueError, match='already has the activation'):
    layers.activate(layers.activate(out, nn.relu), nn.relu)


def test_convs_fed_a_normalized_input_compute_in_the_model_dtype():
  """A bfloat16 unit in CPU training, given float32 input: its convolutions still compute in bfloat16 when
  they compute the (deferred) activation themselves, as they do when given an array."""
  unit = xception.XceptionModule((16, 16, 24), 'conv', False, 2, 1, (1, 1, 1), True,
                                 layers.BNConfig(0.9, 1e-3), dtype=jnp.bfloat16)
  x = jnp.ones((2, 17, 17, 8), jnp.float32)
  variables = unit.init(jax.random.key(0), x)
  _, state = unit.apply(variables, x, mutable=['batch_stats', 'intermediates'], capture_intermediates=True)
  outputs = flax.traverse_util.flatten_dict(state['intermediates'], sep='/')
  convs = {k: v[0].dtype for k, v in outputs.items() if k.endswith(('depthwise/__call__', 'pointwise/__call__'))}
  assert len(convs) == 6 and set(convs.values()) == {jnp.dtype(jnp.bfloat16)}, convs


def test_resize_bilinear_align_corners_exact_values():
  x = jnp.asarray([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
  y = layers.resize_bilinear(x, (3, 3))[0, :, :, 0]
  np.testing.assert_allclose(y, [[0, .5, 1], [1, 1.5, 2], [2, 2.5, 3]], atol=1e-7)
  # From one pixel (image pooling) it is a broadcast; to one pixel it takes the corner.
  np.testing.assert_allclose(layers.resize_bilinear(x[:, :1, :1], (2, 3)), jnp.zeros((1, 2, 3, 1)))
  np.testing.assert_allclose(layers.resize_bilinear(x, (1, 1))[0, 0, 0, 0], 0.0)
  # 3 -> 5: the output samples input positions 0, .5, 1, 1.5, 2.
  z = layers.resize_bilinear(jnp.asarray([0.0, 4.0, 8.0]).reshape(1, 3, 1, 1), (5, 1))
  np.testing.assert_allclose(z[0, :, 0, 0], [0, 2, 4, 6, 8], atol=1e-6)


def test_explicit_padding_and_scale_dimension():
  assert layers.explicit_pads(3) == (1, 1)
  assert layers.explicit_pads(3, rate=2) == (2, 2)
  assert layers.explicit_pads(4) == (1, 2)  # the odd pixel after, as TF fixed_padding
  assert layers.explicit_pads(1) == (0, 0)
  assert layers.scale_dimension(513, 1 / 16) == 33
  assert layers.scale_dimension(512, 1 / 16) == 32
  assert layers.scale_dimension(513, 0.75) == 385


def test_jitted_forward_compiles_once_per_input_shape():
  config = get_config('tiny')
  model = create_model(config.model)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 33, 33, 3)))
  traces = []

  @jax.jit
  def forward(v, x):
    traces.append(x.shape)
    return model.apply(v, x)

  for _ in range(3):
    forward(variables, jnp.ones((2, 33, 33, 3)))
  assert len(traces) == 1
  out = forward(variables, jnp.ones((1, 41, 41, 3)))
  forward(variables, jnp.zeros((1, 41, 41, 3)))
  assert len(traces) == 2 and out.shape == (1, 41, 41, config.model.num_classes)


def test_train_mode_updates_batch_stats_and_uses_dropout():
  model = create_model(get_config('tiny').model)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 33, 33, 3), maxval=255.0)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  apply = jax.jit(lambda v, x, k: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                 rngs={'dropout': k}))
  out1, state = apply(variables, x, jax.random.PRNGKey(1))
  out2, _ = apply(variables, x, jax.random.PRNGKey(2))
  assert not np.allclose(out1, out2)  # dropout after the ASPP projection
  before = flax.traverse_util.flatten_dict(variables['batch_stats'])
  after = flax.traverse_util.flatten_dict(state['batch_stats'])
  assert set(before) == set(after)
  assert any(not np.allclose(before[k], after[k]) for k in before)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = get_config('tiny')
  config.model.dtype = 'bfloat16'
  model = create_model(config.model)
  variables, logits, inter = abstract_apply(model, 33)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  assert logits.dtype == jnp.float32
  assert inter['backbone_features'].dtype == jnp.bfloat16


def test_bfloat16_model_trains_with_float32_gradients():
  """The backward of a bf16-compute model compiles on this platform and gives finite float32 gradients."""
  config = get_config('tiny')
  config.model.dtype = 'bfloat16'
  model = create_model(config.model)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 33, 33, 3), maxval=255.0)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.PRNGKey(2)})
    return jnp.mean(logits ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_remat_gives_the_same_loss_and_gradients():
  config = get_config('tiny')
  # Batch-2 BatchNorm in train mode (image pooling normalises 2 values) amplifies float reordering ~300x;
  # frozen BN keeps the comparison about rematerialisation.
  config.model.fine_tune_batch_norm = False
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 33, 33, 3), maxval=255.0)
  plain = create_model(config.model)
  config.model.remat = True
  remat = create_model(config.model)
  variables = jax.jit(plain.init)(jax.random.PRNGKey(0), x)

  def grads(model, compiler_options=None):
    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(3)})
      return jnp.mean(logits ** 2)
    compiled = jax.jit(jax.value_and_grad(loss), compiler_options=compiler_options).lower(
        variables['params']).compile()
    return compiled(variables['params']), compiled.memory_analysis().temp_size_in_bytes

  # The train step's options for a CPU mesh: without them XLA:CPU merges the recomputation back into the
  # forward pass and remat keeps as much as the plain model (here 2.11 MB of temporaries vs 2.02 MB).
  options = train.cpu_compiler_options(train.create_mesh(jax.devices()[:1]))
  assert options == {'xla_disable_hlo_passes': 'cse_barrier_expander'}
  ((l1, g1), plain_bytes), ((l2, g2), remat_bytes) = grads(plain), grads(remat, options)
  assert remat_bytes < 0.7 * plain_bytes, (remat_bytes, plain_bytes)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    # Recomputation reorders float sums: compare against each gradient's own scale.
    np.testing.assert_allclose(a, b, atol=1e-3 * float(jnp.max(jnp.abs(b))) + 1e-8)
