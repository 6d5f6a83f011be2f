"""The one chunk step (`pallas_kernels.chunk_math`) on plain arrays, as the kernels call it (one
chunk, packed heads) and as the XLA forms do (batches of chunks): fast, and pinpoints failures."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from closeness import assert_close
from pallas_kernels.chunk_math import ChunkLayout, ChunkMath, chunk_constants
from pallas_kernels.wkv_policy import LOG_DECAY_MIN
from wkv_inputs import float32, make_inputs, recurrence

NAMES = ("r", "log_w", "k", "v", "a", "b")


def _math(layout, dtype=np.float32):
  return ChunkMath(layout, chunk_constants(layout, dtype))


def _pack(x_TGN):
  T, G, N = x_TGN.shape
  return jnp.asarray(x_TGN.reshape(T, G * N))


def _block_diag(states_GNN):
  G, N, _ = states_GNN.shape
  packed = np.zeros((G * N, G * N), states_GNN.dtype)
  for h in range(G):
    packed[h * N:(h + 1) * N, h * N:(h + 1) * N] = states_GNN[h]
  return jnp.asarray(packed)


@functools.lru_cache(maxsize=None)
def _jitted_chunk_forward(layout):
  math = _math(layout)

  def run(state, r, log_w, k, v, a, b, reset_C1):
    resets = math.reset_masks(reset_C1) if layout.has_reset else None
    return math.forward(state, math.terms(r, log_w, k, v, a, b, resets))

  return jax.jit(run)


@pytest.mark.parametrize("C,G,reset_rate", [(16, 2, 0.2), (64, 1, 0.0)])
def test_chunks_match_float64_recurrence(C, G, reset_rate):
  """Chunk after chunk through the kernels' entry points, packed heads and resets included."""
  N = 16
  layout = ChunkLayout(C, G, N, G * N, reset_rate > 0)
  r, log_w, k, v, a, b, state, reset = float32(
      make_inputs(np.random.default_rng(0), 1, 2 * C, G, N, reset_rate=reset_rate))
  y_want, state_want = recurrence(r, log_w, k, v, a, b, state, reset)
  run = _jitted_chunk_forward(layout)
  packed_state = _block_diag(state[0])
  for start in range(0, 2 * C, C):
    chunk = [_pack(x[0, start:start + C]) for x in (r, log_w, k, v, a, b)]
    reset_C1 = jnp.zeros((C, 1)) if reset is None else jnp.asarray(reset[0, start:start + C, None], jnp.float32)
    y, packed_state = run(packed_state, *chunk, reset_C1)
    assert_close(np.asarray(y).reshape(C, G, N), y_want[0, start:start + C], 1e-5, "y")
  for h in range(G):
    got = np.asarray(packed_state)[h * N:(h + 1) * N, h * N:(h + 1) * N]
    assert_close(got, state_want[0, h], 1e-5, "final state")


@pytest.mark.parametrize("sliced", [False, True], ids=["masked", "sliced"])
@pytest.mark.parametrize("C", [16, 32, 64])
def test_ladder_inverse_is_exact(C, sliced):
  """Both ways of running the ladder (kernels: masked full-size products; XLA: merges on
  slices). float64: random strictly lower A to 1e-12. fp32, the worst cases: all removal keys
  aligned with iclr = 1 and no decay (A = -strict-lower ones) or the strongest decay, where the
  doubling product over a 64 chunk loses all precision (docs/architecture.md#the-chunked-wkv-7-form)."""
  layout = ChunkLayout(C, 1, 16, 16, False, sliced_inverse=sliced)
  rng = np.random.default_rng(C)
  random = np.tril(rng.normal(size=(3, C, C)) / np.sqrt(C), -1)
  with jax.enable_x64(True):
    got = jax.jit(_math(layout, np.float64).unit_lower_inverse)(jnp.asarray(random))
  assert_close(got, np.linalg.inv(np.eye(C) - random), 1e-12, "float64")
  g = LOG_DECAY_MIN * np.arange(C)
  decayed = -np.exp(g[:, None] - g[None, :] + LOG_DECAY_MIN) * np.tri(C, k=-1)
  for A in (-np.tri(C, k=-1), decayed):
    got = jax.jit(_math(layout).unit_lower_inverse)(jnp.asarray(A, jnp.float32))
    assert_close(got, np.linalg.inv(np.eye(C) - A), 1e-5, "fp32 aligned")


def _chunk_problem(C, G, N, dtype, seed=1):
  layout = ChunkLayout(C, G, N, G * N, True)
  math = _math(layout, dtype)
  r, log_w, k, v, a, b, state, reset = make_inputs(np.random.default_rng(seed), 2, C, G, N,
                                                   reset_rate=0.2)
  row = 1  # row 0 drops its initial state at t = 0
  resets = math.reset_masks(jnp.asarray(reset[row, :, None], dtype))
  inputs = tuple(_pack(np.asarray(x[row], dtype)) for x in (r, log_w, k, v, a, b))
  rng = np.random.default_rng(2)
  block_diag = jnp.asarray(math.consts.block_diag)
  d_y = jnp.asarray(rng.normal(size=(C, G * N)), dtype)
  d_end = jnp.asarray(rng.normal(size=(G * N, G * N)), dtype) * block_diag
  return math, resets, _block_diag(np.asarray(state[row], dtype)), inputs, d_y, d_end


@pytest.mark.parametrize("dtype,tolerance", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_backward_matches_autodiff_of_forward(dtype, tolerance):
  """The hand-written backward (state part by hand, the inverse's closed-form gradient) against
  jax.vjp through the whole forward, inverse included; two packed heads with resets."""
  with jax.enable_x64(dtype == np.float64):
    math, resets, state, inputs, d_y, d_end = _chunk_problem(16, 2, 8, dtype)

    def autodiff(state, *inputs):
      _, pull = jax.vjp(lambda s, *x: math.forward(s, math.terms(*x, resets)), state, *inputs)
      d_state, *d_inputs = pull((d_y, d_end))
      return d_state * math.consts.block_diag, tuple(d_inputs)

    want = jax.jit(autodiff)(state, *inputs)
    got = jax.jit(lambda s, *x: math.backward(s, x, d_y, d_end, resets))(state, *inputs)
  for name, g, w in zip(("state",) + NAMES, (got[0], *got[1]), (want[0], *want[1])):
    assert_close(g, w, tolerance, f"d{name}")


def test_batched_chunks_equal_one_chunk_at_a_time():
  """The XLA forms call the chunk step on [chunks, batch, heads, C, N]; each slice must equal
  the kernels' one-chunk call."""
  C, N = 16, 8
  with jax.enable_x64(True):
    math = ChunkMath.for_arrays(C, N, np.float64, has_reset=True)
    r, log_w, k, v, a, b, state, reset = make_inputs(np.random.default_rng(4), 3, C, 2, N)
    inputs_XCN = [jnp.asarray(np.swapaxes(x, 1, 2)) for x in (r, log_w, k, v, a, b)]  # [B,H,C,N]
    reset_X1C1 = jnp.asarray(reset, jnp.float64)[:, None, :, None]
    state = jnp.asarray(state)
    batched = math.forward(state, math.terms(*inputs_XCN, math.reset_masks(reset_X1C1)))
    for row in range(3):
      for head in range(2):
        one = math.forward(state[row, head],
                           math.terms(*(x[row, head] for x in inputs_XCN),
                                      math.reset_masks(reset_X1C1[row, 0])))
        for got, want in zip(batched, one):
          assert_close(got[row, head], want, 1e-14, "batched")


def test_chunk_summaries_compose_like_the_sequence():
  """(M, B) summaries combined by associative_scan give every chunk's incoming state, and
  combine_affine is associative."""
  with jax.enable_x64(True):
    math = ChunkMath.for_arrays(16, 8, np.float64, has_reset=False)
    r, log_w, k, v, a, b, state, _ = (
        None if x is None else jnp.asarray(x)
        for x in make_inputs(np.random.default_rng(11), 4, 16, 1, 8, reset_rate=0))
    # the batch axis plays the chunk axis: four consecutive chunks of one head
    terms = math.terms(*(x[:, :, 0] for x in (r, log_w, k, v, a, b)))
    summaries = math.summary(terms)
    prefix_m, prefix_b = jax.lax.associative_scan(math.combine_affine, summaries)
    current = state[0, 0]
    for chunk in range(4):
      _, current = math.forward(current, jax.tree.map(lambda x, c=chunk: x[c], terms))
      via_prefix = math.apply_affine(state[0, 0], (prefix_m[chunk], prefix_b[chunk]))
      assert_close(via_prefix, current, 1e-12, f"prefix {chunk}")
    first, second, third = (jax.tree.map(lambda x, c=c: x[c], summaries) for c in range(3))
    left = math.combine_affine(math.combine_affine(first, second), third)
    right = math.combine_affine(first, math.combine_affine(second, third))
    for x, y in zip(left, right):
      assert_close(x, y, 1e-12, "associativity")


def test_layout_refuses_chunks_that_are_not_powers_of_two():
  with pytest.raises(ValueError, match="power of two"):
    ChunkLayout(24, 1, 16, 16, False)
