"""Tests for deeplab_jax.optim: poly schedule values, bias gradient multiplier, momentum SGD updates."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from deeplab_jax import optim


def test_poly_schedule_values():
  schedule = optim.poly_schedule(0.01, 100, 0.9)
  np.testing.assert_allclose(float(schedule(0)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(50)), 0.01 * 0.5 ** 0.9, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(99)), 0.01 * 0.01 ** 0.9, rtol=1e-5)
  assert float(schedule(100)) == 0.0


def test_poly_schedule_with_linear_warmup():
  schedule = optim.poly_schedule(0.01, 110, 0.9, warmup_steps=10, warmup_start_learning_rate=0.001)
  np.testing.assert_allclose(float(schedule(0)), 0.001, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(5)), 0.0055, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(60)), 0.01 * 0.5 ** 0.9, rtol=1e-6)


def test_sgd_momentum_with_doubled_conv_bias_gradients():
  config = default.get_config().train
  config.base_learning_rate, config.num_steps, config.learning_power = 0.1, 1000, 1.0
  tx, _ = optim.create_optimizer(config)
  params = {'conv': {'kernel': jnp.zeros(2), 'bias': jnp.zeros(2)}, 'conv/BatchNorm': {'bias': jnp.zeros(2)}}
  grads = {'conv': {'kernel': jnp.ones(2), 'bias': jnp.ones(2)}, 'conv/BatchNorm': {'bias': jnp.ones(2)}}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates['conv']['bias'], -0.2, rtol=1e-6)
  np.testing.assert_allclose(updates['conv/BatchNorm']['bias'], -0.1, rtol=1e-6)
  # Second step: accum = 0.9 * accum + g, lr(1) = 0.1 * (1 - 1/1000).
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.1 * 0.999 * 1.9, rtol=1e-5)
  np.testing.assert_allclose(updates['conv']['bias'], -0.1 * 0.999 * 3.8, rtol=1e-5)


@pytest.mark.parametrize('field,value,match', [
    ('base_learning_rate', 0.0, 'base_learning_rate'),
    ('momentum', 1.0, 'momentum'),
    ('num_steps', 0, 'num_steps'),
    ('warmup_steps', 30_000, 'warmup_steps'),
    ('weight_decay', -1.0, 'weight_decay'),
])
def test_bad_config_values_name_the_field(field, value, match):
  config = default.get_config().train
  config[field] = value
  with pytest.raises(ValueError, match=match):
    optim.create_optimizer(config)


def test_is_conv_bias():
  assert isinstance(optim.scale_bias_gradients(), optax.GradientTransformation)
  key = lambda *names: [type('K', (), {'key': n})() for n in names]
  assert optim.is_conv_bias(key('logits/semantic', 'bias'))
  assert not optim.is_conv_bias(key('aspp0/BatchNorm', 'bias'))
  assert not optim.is_conv_bias(key('conv', 'kernel'))
