"""Dense CRF: exact mean-field by hand, lattice vs exact, vs pydensecrf2, padding, capacity, batching, jit."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from deeplab_jax import crf

V1, V2 = crf.CRFParams.VGG16_V1, crf.CRFParams.RESNET101_V2
SINGLE = dict(capacity_fractions=())  # one lattice size: one compilation per test


def voc_case(shared_data, image_id: str, size=None, crop=None, num_classes=21, seed=0):
  """(uint8 image [H, W, 3], float32 probabilities [H, W, K]) of a real VOC image, from its noisy GT."""
  voc = shared_data / 'voc2012_train_subset'
  image = Image.open(voc / 'JPEGImages' / f'{image_id}.jpg').convert('RGB')
  label = Image.open(voc / 'SegmentationClass' / f'{image_id}.png')
  if size is not None:
    image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
  image, label = np.array(image, np.uint8), np.array(label).astype(np.int64)
  if crop is not None:
    image, label = image[crop], label[crop]
  label[label == 255] = 0
  rng = np.random.default_rng(seed)
  logits = 2.0 * np.eye(num_classes)[label] + rng.normal(0.0, 1.0, label.shape + (num_classes,))
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  return image, (probabilities / probabilities.sum(-1, keepdims=True)).astype(np.float32)


def run(fn, image, probabilities, params, **kwargs):
  return np.asarray(jax.jit(lambda p, i: fn(p, i, params, **kwargs))(probabilities[None], image[None])[0])


def test_params_paper_defaults_and_config():
  fields = lambda p: (p.w1, p.theta_alpha, p.theta_beta, p.w2, p.theta_gamma, p.num_iterations)
  assert fields(V1) == (4, 121, 5, 3, 3, 10)
  assert fields(V2) == (4, 67, 3, 3, 1, 10)
  config = ml_collections.ConfigDict(dict(enabled=True, w1=5, theta_alpha=80, theta_beta=4, w2=2,
                                          theta_gamma=2, num_iterations=5))
  assert crf.CRFParams.from_config(config) == crf.CRFParams(5.0, 80.0, 4.0, 2.0, 2.0, 5)
  config.theta_betta = 3
  with pytest.raises(ValueError, match='unknown.*theta_betta'):
    crf.CRFParams.from_config(config)
  with pytest.raises(ValueError, match='theta_beta'):
    crf.CRFParams(theta_beta=0.0)


@pytest.mark.parametrize('normalization', crf.NORMALIZATIONS)
def test_exact_mean_field_two_pixels_by_hand(normalization):
  # Two pixels side by side (x = 0, 1), colours 0 and 3 in red: |dp| = 1, |dI| = 3 (red only).
  params = crf.CRFParams(w1=1.5, theta_alpha=2.0, theta_beta=3.0, w2=0.5, theta_gamma=1.0, num_iterations=2)
  image = np.array([[[0, 0, 0], [3, 0, 0]]], np.uint8)
  probabilities = np.array([[[0.8, 0.2], [0.3, 0.7]]], np.float32)
  k_bilateral = math.exp(-0.5 * ((1 / 2.0) ** 2 + (3 / 3.0) ** 2))
  k_gaussian = math.exp(-0.5)
  # Both rows of [[1, k], [k, 1]] sum to 1 + k, so symmetric and row normalisation both give K / (1 + k).
  message = lambda q, k: [[(q[i][l] + k * q[1 - i][l]) / (1 + k) for l in range(2)] for i in range(2)]
  q = [[0.8, 0.2], [0.3, 0.7]]  # softmax(-unary) = softmax(log p) = p
  for _ in range(2):
    bilateral, gaussian = message(q, k_bilateral), message(q, k_gaussian)
    logits = [[math.log(probabilities[0, i, l]) + 1.5 * bilateral[i][l] + 0.5 * gaussian[i][l]
               for l in range(2)] for i in range(2)]
    q = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
  ours = run(crf.dense_crf_exact, image, probabilities, params, normalization=normalization)
  np.testing.assert_allclose(ours[0], np.array(q), atol=1e-6)
  assert abs(q[0][0] - 0.8) > 0.01  # the pairwise terms did move the marginals


def test_exact_gaussian_kernel_is_what_the_grid_filter_computes(shared_data):
  # w1 = 0: only the smoothness kernel, computed on the grid by dense_crf and as an N x N matrix here.
  image, probabilities = voc_case(shared_data, '2007_000032', crop=np.s_[100:132, 200:240])
  for theta_gamma in (1.0, 3.0):
    params = crf.CRFParams(w1=0.0, theta_gamma=theta_gamma)
    lattice = run(crf.dense_crf, image, probabilities, params, **SINGLE)
    exact = run(crf.dense_crf_exact, image, probabilities, params)
    np.testing.assert_allclose(lattice, exact, atol=5e-5)  # truncation at 4 theta_gamma


def test_lattice_mean_field_close_to_exact_32x32(shared_data):
  # The permutohedral lattice approximates the bilateral Gaussian (it is densecrf's own approximation, and
  # pydensecrf2 is exactly as far from the exact CRF). Marginals agree closely on most pixels; the maximum
  # difference is set by a few ambiguous pixels that the approximation tips to another label. On this
  # 32x32 crop, 21 classes, 10 iterations, measured mean |dQ| / max |dQ| / argmax agreement:
  # V2 8.4e-4 / 0.94 / 99.2%, V1 3.7e-4 / 0.79 / 99.5%, bilateral term alone 3.7e-3 / 0.86 / 97.5%.
  image, probabilities = voc_case(shared_data, '2007_000032', crop=np.s_[100:132, 200:232])
  cases = ((V2, 1.5e-3, 0.99), (V1, 1e-3, 0.99), (crf.CRFParams(w2=0.0), 6e-3, 0.97))
  for params, mean_bound, agreement in cases:
    lattice = run(crf.dense_crf, image, probabilities, params, **SINGLE)
    exact = run(crf.dense_crf_exact, image, probabilities, params)
    difference = np.abs(lattice - exact)
    assert difference.mean() <= mean_bound, (params, difference.mean(), difference.max())
    assert np.mean(lattice.argmax(-1) == exact.argmax(-1)) >= agreement
    assert np.mean(exact.argmax(-1) != probabilities.argmax(-1)) > 0.05  # the CRF changes labels


def _pydensecrf(image, probabilities, params, normalization='symmetric'):
  dcrf = pytest.importorskip('pydensecrf.densecrf')
  height, width, num_classes = probabilities.shape
  kind = {'symmetric': dcrf.NORMALIZE_SYMMETRIC, 'row': dcrf.NORMALIZE_AFTER}[normalization]
  model = dcrf.DenseCRF2D(width, height, num_classes)
  unary = -np.log(np.maximum(probabilities, crf.PROBABILITY_FLOOR)).reshape(-1, num_classes).T
  model.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
  if params.w2:
    model.addPairwiseGaussian(sxy=params.theta_gamma, compat=params.w2, normalization=kind)
  model.addPairwiseBilateral(sxy=params.theta_alpha, srgb=params.theta_beta,
                             rgbim=np.ascontiguousarray(image), compat=params.w1, normalization=kind)
  return np.array(model.inference(params.num_iterations)).T.reshape(height, width, num_classes)


@pytest.mark.parametrize('normalization', crf.NORMALIZATIONS)
def test_lattice_is_densecrfs_lattice(shared_data, normalization):
  # Bilateral term alone: same elevation, rounding, simplices, blur and slice as densecrf, so the marginals
  # equal pydensecrf2's up to float summation order.
  image, probabilities = voc_case(shared_data, '2007_000039', size=(125, 94), crop=np.s_[10:74, 20:100])
  for params in (crf.CRFParams(w2=0.0), crf.CRFParams(w1=3.0, theta_alpha=121.0, theta_beta=5.0, w2=0.0)):
    theirs = _pydensecrf(image, probabilities, params, normalization)
    ours = run(crf.dense_crf, image, probabilities, params, normalization=normalization, **SINGLE)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(ours - probabilities).max() > 0.3


def test_matches_pydensecrf_on_voc_images(shared_data):
  # Full CRF with the paper parameters on real VOC images (reduced to keep the test fast). The smoothness
  # term is exact here and lattice-approximated in pydensecrf: argmax agreement, not equality.
  for image_id, params in (('2007_000063', V2), ('2007_000121', V1), ('2007_000170', V2)):
    image, probabilities = voc_case(shared_data, image_id, size=(125, 94))
    theirs = _pydensecrf(image, probabilities, params)
    ours = run(crf.dense_crf, image, probabilities, params, **SINGLE)
    assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.99
    assert np.mean(ours.argmax(-1) != probabilities.argmax(-1)) > 0.05


@pytest.mark.parametrize('fn', [crf.dense_crf, crf.dense_crf_exact])
def test_padding_never_enters_the_crf(shared_data, fn):
  image, probabilities = voc_case(shared_data, '2007_000032', crop=np.s_[120:150, 190:226])
  height, width = probabilities.shape[:2]
  rng = np.random.default_rng(1)
  padded_image = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)  # garbage padding
  padded_probabilities = rng.dirichlet(np.ones(21), (40, 48)).astype(np.float32)
  padded_image[:height, :width], padded_probabilities[:height, :width] = image, probabilities
  valid = np.zeros((40, 48), bool)
  valid[:height, :width] = True
  kwargs = SINGLE if fn is crf.dense_crf else {}
  alone = run(fn, image, probabilities, V2, **kwargs)
  padded = np.asarray(jax.jit(lambda p, i, v: fn(p, i, V2, v, **kwargs))(
      padded_probabilities[None], padded_image[None], valid[None])[0])
  np.testing.assert_allclose(padded[:height, :width], alone, atol=1e-5)
  np.testing.assert_array_equal(padded[~valid], padded_probabilities[~valid])


def test_capacity_ladder_gives_the_full_lattice_result(shared_data):
  # Noise needs nearly one lattice vertex per simplex corner (the full size); a natural image a small one.
  rng = np.random.default_rng(2)
  noise = rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)
  natural, probabilities = voc_case(shared_data, '2007_000032', crop=np.s_[100:120, 200:224])
  for image in (noise, natural):
    ladder = run(crf.dense_crf, image, probabilities, V2, capacity_fractions=(0.02, 0.1, 0.3))
    full = run(crf.dense_crf, image, probabilities, V2, capacity_fractions=())
    np.testing.assert_allclose(ladder, full, atol=1e-6)
  corners = crf._insert_corners(crf._bilateral_features(20, 24, jnp.asarray(noise), V2), jnp.ones(480, bool))
  assert int(corners.num_vertices) > 0.3 * 480 * 6  # the noise image did take the full-size branch


def test_batch_and_single_compilation(shared_data):
  first, first_probabilities = voc_case(shared_data, '2007_000032', crop=np.s_[100:124, 200:228])
  second, second_probabilities = voc_case(shared_data, '2007_000039', crop=np.s_[150:174, 100:128], seed=1)
  fn = jax.jit(lambda p, i, params: crf.dense_crf(p, i, params, **SINGLE))
  batch = np.asarray(fn(np.stack([first_probabilities, second_probabilities]), np.stack([first, second]), V2))
  # Another compilation sums in another order; 10 iterations amplify that to ~1e-4 at ambiguous pixels.
  np.testing.assert_allclose(batch[0], fn(first_probabilities[None], first[None], V2)[0], atol=2e-4)
  np.testing.assert_allclose(batch[1], fn(second_probabilities[None], second[None], V2)[0], atol=2e-4)
  fn(second_probabilities[None], second[None], crf.CRFParams(w1=5.0, theta_alpha=50.0, theta_beta=4.0))
  assert fn._cache_size() == 2  # batch 2 and batch 1; new weights and widths did not recompile


def test_zero_iterations_return_the_input():
  rng = np.random.default_rng(3)
  probabilities = rng.dirichlet(np.ones(5), (1, 6, 7)).astype(np.float32)
  probabilities = np.maximum(probabilities, 1e-3) / np.maximum(probabilities, 1e-3).sum(-1, keepdims=True)
  images = rng.integers(0, 256, (1, 6, 7, 3)).astype(np.uint8)
  params = crf.CRFParams(num_iterations=0)
  for fn in (crf.dense_crf, crf.dense_crf_exact):
    np.testing.assert_allclose(fn(probabilities, images, params), probabilities, atol=1e-6)
