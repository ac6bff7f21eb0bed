"""Fully-connected CRF of DeepLab V1/V2 (Krahenbuhl & Koltun, NIPS 2011): mean-field inference in JAX.

The energy has the network's unaries `-log p` and two Potts pairwise terms over all pairs of pixels:

  appearance (bilateral): w1 * exp(-|p_i - p_j|^2 / (2 theta_alpha^2) - |I_i - I_j|^2 / (2 theta_beta^2))
  smoothness (Gaussian):  w2 * exp(-|p_i - p_j|^2 / (2 theta_gamma^2))

with positions `p` in pixels and colours `I` in raw RGB 0..255. The conventions are those of the reference
code (Krahenbuhl's densecrf 2.x as wrapped by pydensecrf / pydensecrf2, `DenseCRF2D.addPairwiseBilateral(
sxy=theta_alpha, srgb=theta_beta, rgbim, compat=w1)` and `addPairwiseGaussian(sxy=theta_gamma, compat=w2)`,
as DeepLab's released CRF usage maps them):

- kernel features are `(x, y) / theta` and `(x, y, r, g, b) / (theta_alpha, theta_alpha, theta_beta x3)`,
  with `x` the column; a kernel is `exp(-|f_i - f_j|^2 / 2)`;
- each kernel is normalised symmetrically (`NORMALIZE_SYMMETRIC`, pydensecrf's default): the message is
  `D^-1/2 K D^-1/2 Q` with `D = diag(K 1)`; `normalization='row'` gives `D^-1 K Q` (`NORMALIZE_AFTER`, the
  normalisation of the densecrf 1.0 code that DeepLab's own `refine_pascal` binary was built on);
- the filter includes the pixel itself (`K_ii = 1`): densecrf 2.x does not subtract the self term;
- Potts compatibility `-w` (densecrf's `PottsCompatibility`), so one step is
  `Q = softmax(-unary + w1 * msg_bilateral + w2 * msg_gaussian)`, starting from `Q = softmax(-unary)`;
- unaries `-log(max(p, 1e-5))` (pydensecrf `utils.unary_from_softmax`).

`dense_crf` filters the bilateral term with the permutohedral lattice (Adams et al. 2010) exactly as densecrf
builds it (same elevation, rounding, simplex ranks, barycentric weights, blur order and alpha), and the
Gaussian term exactly, as a separable truncated (4 sigma) convolution on the pixel grid. The lattice is built
once per image; each of the `num_iterations` steps is one splat (segment sum), `d + 1` blur passes and one
slice (gather) over all K classes at once. Everything has static shapes, so it compiles once per image size
and class count. `dense_crf_exact` is the O(N^2) mean-field with dense kernels, for tests on small images.

Parameters: DeepLab fixed w2 = 3 and theta_gamma and chose w1, theta_alpha and theta_beta by a coarse-to-fine
grid search on 100 images of VOC 2012 val (DeepLab V1, ICLR 2015, Sec. 4.1; DeepLab-v2, TPAMI 2017), 10
mean-field iterations. `CRFParams.VGG16_V1` (w1=4, theta_alpha=121, theta_beta=5, w2=3, theta_gamma=3) and
`CRFParams.RESNET101_V2` (w1=4, theta_alpha=67, theta_beta=3, w2=3, theta_gamma=1) are their released
settings; `benchmarks/crf_search.py` repeats such a search for another model.
"""
import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array
PROBABILITY_FLOOR = 1e-5  # pydensecrf `unary_from_softmax(clip=1e-5)`: unaries are at most -log(1e-5)
NORMALIZATIONS = ('symmetric', 'row')
_NORM_EPSILON = 1e-20  # densecrf adds it to the kernel row sums before inverting them
_GAUSSIAN_TRUNCATE = 4.0  # the grid Gaussian drops weights beyond 4 sigma (relative weight < 3.4e-4)
_EMPTY = np.iinfo(np.int32).max  # a free hash-table slot


@dataclasses.dataclass(frozen=True)
class CRFParams:
  """Dense CRF parameters (names of the DeepLab papers).

  A pytree whose weights and bilateral widths are leaves and whose `theta_gamma` (it sets the size of a
  convolution) and `num_iterations` are static, so a parameter search can pass it to one jitted function
  without recompiling; in a config-driven jitted step it is simply closed over.

  Attributes:
    w1: weight of the bilateral (appearance) kernel.
    theta_alpha: its spatial standard deviation, in pixels.
    theta_beta: its colour standard deviation, in RGB levels (0..255).
    w2: weight of the Gaussian (smoothness) kernel.
    theta_gamma: its spatial standard deviation, in pixels.
    num_iterations: mean-field iterations.
  """
  w1: float = 4.0
  theta_alpha: float = 67.0
  theta_beta: float = 3.0
  w2: float = 3.0
  theta_gamma: float = 1.0
  num_iterations: int = 10

  def __post_init__(self):
    concrete = lambda name: isinstance(getattr(self, name), (int, float))  # not traced
    for name in ('theta_alpha', 'theta_beta', 'theta_gamma'):
      if concrete(name) and not getattr(self, name) > 0:
        raise ValueError(f'CRF {name}={getattr(self, name)} must be > 0 (a standard deviation).')
    for name in ('w1', 'w2'):
      if concrete(name) and getattr(self, name) < 0:
        raise ValueError(f'CRF weight {name}={getattr(self, name)} must be >= 0.')
    if int(self.num_iterations) != self.num_iterations or self.num_iterations < 0:
      raise ValueError(f'CRF num_iterations={self.num_iterations} must be a non-negative integer.')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'CRFParams':
    """Reads `config.eval.crf`: `enabled` plus exactly the fields of this class."""
    fields = {field.name for field in dataclasses.fields(cls)}
    names = set(config.keys())
    if names != fields | {'enabled'}:
      raise ValueError(f'config.eval.crf has fields {sorted(names)}; expected exactly '
                       f'{sorted(fields | {"enabled"})} (missing: {sorted(fields | {"enabled"} - names)}, '
                       f'unknown: {sorted(names - fields - {"enabled"})}).')
    return cls(w1=float(config.w1), theta_alpha=float(config.theta_alpha),
               theta_beta=float(config.theta_beta), w2=float(config.w2),
               theta_gamma=float(config.theta_gamma), num_iterations=int(config.num_iterations))


jax.tree_util.register_dataclass(CRFParams, data_fields=['w1', 'theta_alpha', 'theta_beta', 'w2'],
                                 meta_fields=['theta_gamma', 'num_iterations'])
# DeepLab V1 (VGG-16 LargeFOV, ICLR 2015, Sec. 4.1) and DeepLab-v2 (ResNet-101, TPAMI 2017, Sec. 4.1).
CRFParams.VGG16_V1 = CRFParams(w1=4.0, theta_alpha=121.0, theta_beta=5.0, w2=3.0, theta_gamma=3.0)
CRFParams.RESNET101_V2 = CRFParams(w1=4.0, theta_alpha=67.0, theta_beta=3.0, w2=3.0, theta_gamma=1.0)


def unary_from_probabilities(probabilities: Array) -> Array:
  """`-log(max(p, 1e-5))`, the unary energy of pydensecrf's `unary_from_softmax`."""
  return -jnp.log(jnp.maximum(probabilities.astype(jnp.float32), PROBABILITY_FLOOR))


def _check_inputs(probabilities, images, valid_mask, normalization):
  if probabilities.ndim != 4 or images.shape != probabilities.shape[:3] + (3,):
    raise ValueError(f'dense_crf needs probabilities [B, H, W, K] and images [B, H, W, 3] of the same B, H, '
                     f'W; got {probabilities.shape} and {images.shape}.')
  if valid_mask is not None and valid_mask.shape != probabilities.shape[:3]:
    raise ValueError(f'valid_mask must be [B, H, W] = {probabilities.shape[:3]}; got {valid_mask.shape}.')
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization={normalization!r} is not one of {NORMALIZATIONS}.')


def _bilateral_features(height: int, width: int, image: Array, params: CRFParams) -> Array:
  """`[H*W, 5]` float32 `(x, y) / theta_alpha, (r, g, b) / theta_beta`, as densecrf's bilateral features."""
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                            indexing='ij')
  positions = jnp.stack([cols, rows], -1) / jnp.float32(params.theta_alpha)
  colours = jnp.clip(image.astype(jnp.float32), 0.0, 255.0) / jnp.float32(params.theta_beta)
  return jnp.concatenate([positions, colours], -1).reshape(height * width, 5)


def _mean_field(unary: Array, messages: list, valid: Array, num_iterations: int) -> Array:
  """Mean-field updates `Q = softmax(-unary + sum_m w_m * message_m(Q))` from `Q = softmax(-unary)`.

  Args:
    unary: `[N, K]` energies.
    messages: `(weight, fn)` pairs; `fn([N, K] Q) -> [N, K]` is a normalised kernel filter.
    valid: `[N]` bool; invalid pixels keep `softmax(-unary)` (they never enter any filter).
    num_iterations: number of updates.

  Returns:
    `[N, K]` marginals.
  """
  def step(_, q):
    logits = -unary
    for weight, message in messages:
      logits = logits + weight * message(q)
    return jnp.where(valid[:, None], jax.nn.softmax(logits, axis=-1), q)

  return lax.fori_loop(0, num_iterations, step, jax.nn.softmax(-unary, axis=-1))


def _normalised(raw_filter: Callable[[Array], Array], valid: Array, normalization: str) -> Callable:
  """Wraps a raw kernel filter (`[N, C] -> [N, C]`, sums over valid pixels only) with densecrf's norm."""
  valid = valid.astype(jnp.float32)[:, None]
  row_sums = raw_filter(valid)
  if normalization == 'symmetric':
    scale = valid * lax.rsqrt(row_sums + _NORM_EPSILON)
    return lambda q: scale * raw_filter(scale * q)
  scale = valid / (row_sums + _NORM_EPSILON)
  return lambda q: scale * raw_filter(valid * q)


def _run_per_image(fn, probabilities, images, valid_mask):
  """`lax.map` of `fn(probabilities [H,W,K], image [H,W,3], valid [H,W])` over the batch.

  Sequential rather than vmapped: each image's lattice has its own data-dependent size, and `lax.cond`
  inside a vmap would run both capacity branches.
  """
  if valid_mask is None:
    valid_mask = jnp.ones(probabilities.shape[:3], bool)
  return lax.map(lambda args: fn(*args), (probabilities.astype(jnp.float32), images, valid_mask.astype(bool)))


# ----------------------------------------------------------------------------------------------------------
# Exact O(N^2) mean-field (tests and small images).
# ----------------------------------------------------------------------------------------------------------


def _dense_kernel_filter(features: Array, valid: Array) -> Callable[[Array], Array]:
  """Raw filter with the dense kernel `exp(-|f_i - f_j|^2 / 2)` over valid pixels, `[N, C] -> [N, C]`."""
  # Differences feature by feature: |a|^2 + |b|^2 - 2ab would cancel catastrophically (colours / 3 ~ 85).
  distances = sum((column[:, None] - column[None, :]) ** 2 for column in features.T)
  kernel = jnp.exp(-0.5 * distances) * valid[None, :].astype(jnp.float32)
  return lambda values: jnp.matmul(kernel, values, precision=lax.Precision.HIGHEST)


def dense_crf_exact(probabilities: Array, images: Array, params: CRFParams,
                    valid_mask: Optional[Array] = None, normalization: str = 'symmetric') -> Array:
  """Exact dense-CRF mean-field with O(N^2) dense kernels; same contract as `dense_crf`.

  Builds the `[N, N]` kernel matrices (N = H*W), so only for small images (64x64 needs 64 MiB per kernel).
  """
  _check_inputs(probabilities, images, valid_mask, normalization)
  _, height, width, _ = probabilities.shape

  def one_image(probs, image, valid):
    valid = valid.reshape(-1)
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing='ij')
    positions = jnp.stack([cols, rows], -1).reshape(-1, 2) / jnp.float32(params.theta_gamma)
    bilateral = _dense_kernel_filter(_bilateral_features(height, width, image, params), valid)
    messages = [(params.w1, _normalised(bilateral, valid, normalization)),
                (params.w2, _normalised(_dense_kernel_filter(positions, valid), valid, normalization))]
    probs = probs.reshape(height * width, -1)
    marginals = _mean_field(unary_from_probabilities(probs), messages, valid, params.num_iterations)
    return jnp.where(valid[:, None], marginals, probs).reshape(height, width, -1)

  return _run_per_image(one_image, probabilities, images, valid_mask)


# ----------------------------------------------------------------------------------------------------------
# Gaussian (smoothness) kernel: exact separable convolution on the pixel grid.
# ----------------------------------------------------------------------------------------------------------


def _grid_gaussian_filter(height: int, width: int, theta: float) -> Callable[[Array], Array]:
  """Raw filter `[H*W, C] -> [H*W, C]` with `exp(-|p_i - p_j|^2 / (2 theta^2))`, truncated at 4 theta.

  Two one-dimensional convolutions, each class a separate plane (XLA:CPU runs `feature_group_count`
  convolutions and chains of shifted slices inside loops slowly). Zero padding: pixels masked out by the
  caller contribute nothing, and the row sums that normalise it come from the same filter.
  """
  def taps(size):
    radius = min(int(math.ceil(_GAUSSIAN_TRUNCATE * theta)), size - 1)
    return radius, jnp.asarray(np.exp(-0.5 * (np.arange(-radius, radius + 1) / theta) ** 2), jnp.float32)

  def apply(values):
    # Classes as the batch dimension of a one-channel convolution, without moving them: 'HWNC' layout.
    planes = values.reshape(height, width, -1, 1)
    dimensions = ('HWNC', 'HWIO', 'HWNC')
    radius, kernel = taps(height)
    planes = lax.conv_general_dilated(planes, kernel.reshape(-1, 1, 1, 1), (1, 1), ((radius, radius), (0, 0)),
                                      dimension_numbers=dimensions, precision=lax.Precision.HIGHEST)
    radius, kernel = taps(width)
    planes = lax.conv_general_dilated(planes, kernel.reshape(1, -1, 1, 1), (1, 1), ((0, 0), (radius, radius)),
                                      dimension_numbers=dimensions, precision=lax.Precision.HIGHEST)
    return planes.reshape(height * width, -1)

  return apply


# ----------------------------------------------------------------------------------------------------------
# Permutohedral lattice (bilateral kernel).
# ----------------------------------------------------------------------------------------------------------


def _scale_factors(dim: int) -> np.ndarray:
  """densecrf's `scale_factor[i] = 1/sqrt((i+1)(i+2)) * sqrt(2/3)(d+1)`, with its float roundings."""
  inv_std_dev = np.float32(np.sqrt(2.0 / 3.0) * (dim + 1))
  return np.array([1.0 / np.sqrt((i + 2.0) * (i + 1.0)) * np.float64(inv_std_dev) for i in range(dim)],
                  np.float32)


def _elevate(features: Array) -> Array:
  """`[N, d] -> [N, d+1]`: features onto the hyperplane `sum = 0` (Adams et al. 2010, p.5), as densecrf."""
  dim = features.shape[-1]
  scale = _scale_factors(dim)
  columns = [None] * (dim + 1)
  running = jnp.zeros(features.shape[:-1], jnp.float32)
  for j in range(dim, 0, -1):
    scaled = features[..., j - 1] * scale[j - 1]
    columns[j] = running - np.float32(j) * scaled
    running = running + scaled
  columns[0] = running
  return jnp.stack(columns, -1)


class _Lattice(NamedTuple):
  """A permutohedral lattice with `capacity` vertex rows plus one always-zero row at index `capacity`."""
  vertices: Array  # [d+1, N] int32 vertex row of each pixel's simplex corner r (capacity: none)
  weights: Array  # [d+1, N] float32 barycentric weights (0 for invalid pixels)
  neighbours: Array  # [d+1, 2, capacity] int32 blur neighbours along each lattice axis (capacity: none)


class _Corners(NamedTuple):
  """The simplex corners of all pixels with their keys inserted in a hash table: the lattice but its size."""
  keys: tuple  # d arrays [N (d+1)] int32: the first d coordinates of each corner (pixel-major)
  owner: Array  # [T] int32 first corner index holding each hash slot's key; _EMPTY for a free slot
  slot: Array  # [N (d+1)] int32 hash slot of each corner's key; T for invalid pixels
  rank: Array  # [T] int32 distinct-key number of each occupied slot (slot order)
  weights: Array  # [N, d+1] float32 barycentric weights, 0 for invalid pixels
  num_vertices: Array  # int32 scalar: distinct keys of valid pixels


def _simplices(features: Array) -> tuple[Array, Array]:
  """Enclosing simplex of each feature point, exactly as densecrf's `Permutohedral::init`.

  Args:
    features: `[N, d]` float32.

  Returns:
    `(keys [N, d+1, d+1] int32, weights [N, d+1] float32)`: for each remainder `r` the full `d+1` lattice
    coordinates of the simplex corner and its barycentric weight.
  """
  dim = features.shape[-1]
  elevated = _elevate(features)
  down = np.float32(1.0 / (dim + 1))
  nearest = jnp.round(elevated * down)  # half to even, as SSE rounding
  rem0 = nearest * np.float32(dim + 1)
  total = jnp.sum(nearest, -1).astype(jnp.int32)
  diff = elevated - rem0
  index = np.arange(dim + 1)
  # rank[i] = #{j > i: diff_j > diff_i} + #{j < i: diff_j >= diff_i} (densecrf's pairwise comparison loop).
  greater = diff[:, None, :] > diff[:, :, None]  # [N, i, j]: diff_j > diff_i
  not_less = diff[:, None, :] >= diff[:, :, None]
  counted = jnp.where(index[None, :] > index[:, None], greater, not_less & (index[None, :] < index[:, None]))
  rank = jnp.sum(counted, -1).astype(jnp.int32) + total[:, None]
  wrap = (dim + 1) * ((rank < 0).astype(jnp.int32) - (rank > dim).astype(jnp.int32))
  rank = rank + wrap
  rem0 = rem0 + wrap.astype(jnp.float32)
  # Barycentric coordinates (p.10 of Adams et al.): u[p] = v_i for the i with d - rank_i = p.
  values = (elevated - rem0) * down
  corner = (dim - rank)[:, :, None] == index[None, None, :]  # [N, i, p]
  u = jnp.sum(jnp.where(corner, values[:, :, None], 0.0), axis=1)
  weights = jnp.concatenate([u[:, :1] + (1.0 - u[:, dim:]), u[:, 1:] - u[:, :-1]], -1)
  # Corner r: rem0 + canonical[r, rank], canonical[r, j] = r if j <= d - r else r - (d + 1).
  remainder = index[:, None]
  canonical = jnp.where(rank[:, None, :] <= dim - remainder[None], remainder[None],
                        remainder[None] - (dim + 1))  # [N, r, i]
  keys = rem0.astype(jnp.int32)[:, None, :] + canonical
  return keys, weights


def _home_slots(keys: tuple, table_size: int) -> Array:
  """Hash of integer keys (tuple of int32 arrays) into `[0, table_size)`, a power of two."""
  hashed = jnp.zeros(keys[0].shape, jnp.uint32)
  for coordinate in keys:
    hashed = (hashed ^ coordinate.astype(jnp.uint32)) * jnp.uint32(0x9E3779B1)
    hashed = hashed ^ (hashed >> 15)
  hashed = (hashed * jnp.uint32(0x85EBCA77)) ^ (hashed >> 13)
  return (hashed & jnp.uint32(table_size - 1)).astype(jnp.int32)


def _same_key(keys: tuple, corner: Array, query: tuple) -> Array:
  """Whether the key of `corner` (indices into `keys`) equals `query`, elementwise."""
  corner = jnp.clip(corner, 0, keys[0].shape[0] - 1)
  return functools.reduce(jnp.logical_and, [coordinate[corner] == q for coordinate, q in zip(keys, query)])


def _insert_corners(features: Array, valid: Array) -> _Corners:
  """Simplex corners of the valid pixels and a hash table of their distinct keys.

  densecrf inserts keys one by one into a hash table with linear probing; here every corner probes in
  parallel, one slot per round, and a free slot goes to the smallest corner index that asks for it
  (scatter-min), so the table is deterministic. The table has at least twice as many slots as corners, so
  it is at most half full and a few rounds settle natural images.
  """
  num_points, dim = features.shape
  num_corners = num_points * (dim + 1)
  table_size = 1 << (2 * num_corners - 1).bit_length()
  all_keys, weights = _simplices(features)
  weights = jnp.where(valid[:, None], weights, 0.0)
  keys = tuple(all_keys[:, :, i].reshape(-1) for i in range(dim))  # d coordinates determine a key
  home = _home_slots(keys, table_size)
  corner = jnp.arange(num_corners, dtype=jnp.int32)

  def probe(state):
    owner, slot, pending, offset = state
    candidate = (home + offset) & (table_size - 1)
    free = owner[candidate] == _EMPTY
    owner = owner.at[jnp.where(pending & free, candidate, table_size)].min(corner, mode='drop')
    holder = owner[candidate]
    found = pending & (holder != _EMPTY) & _same_key(keys, holder, keys)
    return owner, jnp.where(found, candidate, slot), pending & ~found, offset + 1

  start = (jnp.full((table_size,), _EMPTY, jnp.int32), jnp.full((num_corners,), table_size, jnp.int32),
           jnp.repeat(valid, dim + 1), jnp.int32(0))
  owner, slot, _, _ = lax.while_loop(lambda state: jnp.any(state[2]), probe, start)
  occupied = owner != _EMPTY
  rank = jnp.cumsum(occupied.astype(jnp.int32)) - 1
  return _Corners(keys, owner, slot, rank, weights, jnp.sum(occupied).astype(jnp.int32))


def _find_slots(corners: _Corners, query: tuple) -> Array:
  """Hash slot of each query key (tuple of `d` int32 arrays), or -1 where no pixel has that corner."""
  table_size = corners.owner.shape[0]
  home = _home_slots(query, table_size)

  def probe(state):
    slot, pending, offset = state
    candidate = (home + offset) & (table_size - 1)
    holder = corners.owner[candidate]
    found = pending & (holder != _EMPTY) & _same_key(corners.keys, holder, query)
    return jnp.where(found, candidate, slot), pending & ~found & (holder != _EMPTY), offset + 1

  start = (jnp.full(home.shape, -1, jnp.int32), jnp.ones(home.shape, bool), jnp.int32(0))
  return lax.while_loop(lambda state: jnp.any(state[1]), probe, start)[0]


def _make_lattice(corners: _Corners, capacity: int) -> _Lattice:
  """The lattice of `corners` with `capacity` vertex rows (needs `corners.num_vertices <= capacity`).

  Blur neighbours along axis j are `key - 1 + (d+1) e_j` (looked up in the hash table, as densecrf does)
  and `key + 1 - (d+1) e_j` (the inverse map, no lookup needed).
  """
  num_points, corners_per_point = corners.weights.shape
  dim = corners_per_point - 1
  table_size = corners.owner.shape[0]
  occupied = corners.owner != _EMPTY
  row_of_slot = jnp.concatenate([jnp.where(occupied & (corners.rank < capacity), corners.rank, capacity),
                                 jnp.array([capacity], jnp.int32)])  # slot table_size: no vertex
  vertices = row_of_slot[corners.slot]
  owner = jnp.clip(corners.owner, 0, corners.slot.shape[0] - 1)
  unique_keys = tuple(
      jnp.zeros((capacity + 1,), jnp.int32).at[row_of_slot[:-1]].set(coordinate[owner])[:capacity]
      for coordinate in corners.keys)
  rows = jnp.arange(capacity, dtype=jnp.int32)
  used = rows < corners.num_vertices
  neighbours = []
  for axis in range(dim + 1):
    query = tuple(coordinate - 1 + (dim + 1 if i == axis else 0) for i, coordinate in enumerate(unique_keys))
    slot = _find_slots(corners, query)
    below = jnp.where(used & (slot >= 0), row_of_slot[jnp.where(slot >= 0, slot, table_size)], capacity)
    above = jnp.full((capacity + 1,), capacity, jnp.int32).at[below].set(rows)[:capacity]
    neighbours.append(jnp.stack([below, above]))
  return _Lattice(vertices.reshape(num_points, dim + 1).T, corners.weights.T, jnp.stack(neighbours))


def _lattice_filter(lattice: _Lattice, values: Array) -> Array:
  """densecrf's `Permutohedral::compute`: splat, blur along axes 0..d, slice (times alpha). `[N, C]`.

  The gathers are one-dimensional `take`s and the blur updates its buffer in place inside a loop: XLA:CPU
  fuses those into fast loops, while a two-dimensional gather, a concatenate per blur step, or unrolled
  blur steps (which it fuses into one another, recomputing) run several times slower.
  """
  corners, num_points = lattice.weights.shape
  dim = corners - 1
  capacity = lattice.neighbours.shape[-1]
  splatted = (lattice.weights[:, :, None] * values[None]).reshape(corners * num_points, -1)
  grid = jax.ops.segment_sum(splatted, lattice.vertices.reshape(-1), num_segments=capacity + 1)
  take = lambda table, rows: jnp.take(table, rows, axis=0, mode='clip')

  def blur(axis, grid):  # row `capacity` stands for a missing neighbour and stays zero
    below, above = lattice.neighbours[axis]
    return lax.dynamic_update_slice(grid, grid[:capacity] + 0.5 * (take(grid, below) + take(grid, above)),
                                    (0, 0))

  grid = lax.fori_loop(0, corners, blur, grid.at[capacity].set(0.0))
  alpha = np.float32(1.0 / (1.0 + 2.0 ** -dim))
  out = jnp.zeros_like(values)
  for corner in range(corners):
    out = out + (lattice.weights[corner] * alpha)[:, None] * take(grid, lattice.vertices[corner])
  return out


def dense_crf(probabilities: Array, images: Array, params: CRFParams, valid_mask: Optional[Array] = None,
              normalization: str = 'symmetric',
              capacity_fractions: tuple = (1 / 32, 1 / 16, 1 / 8, 1 / 4)) -> Array:
  """Dense-CRF mean-field marginals; the bilateral kernel through the permutohedral lattice.

  Jit-able with static shapes (it compiles once per `[B, H, W, K]`). Pixels where `valid_mask` is False (the
  padding of a padded eval batch) never enter the filters, not even the normalisation: the marginals on the
  valid pixels are those of the CRF on the valid pixels alone. Their output is the input probabilities.

  Args:
    probabilities: `[B, H, W, K]` class probabilities (softmax of the network).
    images: `[B, H, W, 3]` raw RGB pixels in 0..255 (uint8 or float; clipped to 0..255).
    params: `CRFParams`.
    valid_mask: optional `[B, H, W]` bool.
    normalization: 'symmetric' (pydensecrf's default) or 'row' (densecrf 1.0, DeepLab's binary).
    capacity_fractions: lattice sizes compiled besides the full one, as fractions of the `H*W*6` simplex
      corners; each image runs with the smallest that holds its lattice (same result, less work). Natural
      images need 2-16% at the V1/V2 parameters, noise up to 100%.

  Returns:
    `[B, H, W, K]` float32 marginals.
  """
  _check_inputs(probabilities, images, valid_mask, normalization)
  _, height, width, _ = probabilities.shape
  num_points = height * width
  capacities = _capacity_ladder(num_points * 6, capacity_fractions)
  gaussian = _grid_gaussian_filter(height, width, params.theta_gamma)

  def one_image(probs, image, valid):
    valid = valid.reshape(-1)
    probs = probs.reshape(num_points, -1)
    unary = unary_from_probabilities(probs)
    spatial = (params.w2, _normalised(lambda v: gaussian(v * valid[:, None]), valid, normalization))
    corners = _insert_corners(_bilateral_features(height, width, image, params), valid)

    def branch(capacity):
      def run():
        lattice = _make_lattice(corners, capacity)
        bilateral = (params.w1, _normalised(lambda v: _lattice_filter(lattice, v), valid, normalization))
        return _mean_field(unary, [bilateral, spatial], valid, params.num_iterations)
      return run

    # The smallest lattice that holds this image's vertices (the sizes are static, the choice is not).
    index = jnp.sum(corners.num_vertices > jnp.asarray(capacities[:-1], jnp.int32))
    marginals = lax.switch(index, [branch(capacity) for capacity in capacities])
    return jnp.where(valid[:, None], marginals, probs).reshape(height, width, -1)

  return _run_per_image(one_image, probabilities, images, valid_mask)


def _capacity_ladder(num_corners: int, fractions) -> tuple:
  """Static lattice sizes to choose from: `fractions` of the corner count, rounded up, ending with all."""
  sizes = {min(num_corners, max(8, -(-int(math.ceil(f * num_corners)) // 8) * 8)) for f in fractions}
  return tuple(sorted(sizes | {num_corners}))
