"""The per-chunk math of the Pallas kernels, on plain arrays (no Pallas): fast, and pinpoints failures."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import chunk_math as cm
from pallas_oracle import recurrence_f64, relative_error, rwkv7_inputs


def _consts(layout):
  return cm.ChunkConsts(*[jnp.asarray(c) for c in cm.chunk_constants(layout)])


@functools.lru_cache(maxsize=None)
def _jitted_chunk_forward(layout):
  consts = _consts(layout)

  def run(state, r, log_w, k, v, a, b, reset_C1):
    resets = cm.reset_masks(reset_C1, consts) if layout.has_reset else None
    return cm.chunk_forward(state, r, log_w, k, v, a, b, consts, resets, layout)

  return jax.jit(run)


def _pack(x_TGN):
  T, G, N = x_TGN.shape
  return jnp.asarray(x_TGN.reshape(T, G * N))


def _block_diag(states_GNN):
  G, N, _ = states_GNN.shape
  packed = np.zeros((G * N, G * N), np.float32)
  for h in range(G):
    packed[h * N:(h + 1) * N, h * N:(h + 1) * N] = states_GNN[h]
  return jnp.asarray(packed)


@pytest.mark.parametrize("C,G,reset_every", [(16, 2, 5), (64, 1, 0)])
def test_chunks_match_float64_recurrence(C, G, reset_every):
  N = 16
  layout = cm.ChunkLayout(C, G, N, G * N, reset_every > 0, bf16_mxu=False)
  r, log_w, k, v, a, b, state, reset = rwkv7_inputs(0, 1, 2 * C, G, N, reset_every=reset_every)
  y_want, state_want = recurrence_f64(r, log_w, k, v, a, b, state, reset)
  run = _jitted_chunk_forward(layout)
  packed_state = _block_diag(state[0])
  for start in range(0, 2 * C, C):
    chunk = [_pack(x[0, start:start + C]) for x in (r, log_w, k, v, a, b)]
    reset_C1 = jnp.zeros((C, 1)) if reset is None else jnp.asarray(reset[0, start:start + C, None], jnp.float32)
    y, packed_state = run(packed_state, *chunk, reset_C1)
    assert relative_error(np.asarray(y).reshape(C, G, N), y_want[0, start:start + C]) < 1e-5
  for h in range(G):
    got = np.asarray(packed_state)[h * N:(h + 1) * N, h * N:(h + 1) * N]
    assert relative_error(got, state_want[0, h]) < 1e-5


def test_ladder_inverse_is_exact_in_the_aligned_worst_case():
  """All removal keys aligned, iclr = 1, no decay: A_ab = -strict-lower-ones, where the doubling product
  over a 64 chunk loses all precision (spec §1.6). The ladder must match float64 inversion."""
  C = 64
  layout = cm.ChunkLayout(C, 1, 16, 16, False, False)
  consts = _consts(layout)
  rng = np.random.default_rng(0)
  strict = np.tril(np.ones((C, C)), -1)
  for A in (-strict, strict * rng.uniform(-1, 1, size=(C, C))):
    want = np.linalg.inv(np.eye(C) - A)
    got = jax.jit(cm.unit_lower_inverse)(jnp.asarray(A, jnp.float32), consts)
    assert relative_error(got, want) < 1e-5


def test_chunk_backward_matches_autodiff_of_forward():
  C, G, N = 16, 2, 16
  layout = cm.ChunkLayout(C, G, N, G * N, True, bf16_mxu=False)
  consts = _consts(layout)
  r, log_w, k, v, a, b, state, reset = rwkv7_inputs(1, 1, C, G, N, reset_every=5)
  resets = cm.reset_masks(jnp.asarray(reset[0, :, None], jnp.float32), consts)
  primals = (_block_diag(state[0]),) + tuple(_pack(x[0]) for x in (r, log_w, k, v, a, b))
  rng = np.random.default_rng(2)
  dy = jnp.asarray(rng.normal(size=(C, G * N)), jnp.float32)
  dstate = jnp.asarray(rng.normal(size=(G * N, G * N)), jnp.float32) * consts.block_diag

  def autodiff(*primals):
    _, pull = jax.vjp(lambda *p: cm.chunk_forward(*p, consts, resets, layout), *primals)
    grads = pull((dy, dstate))
    return (grads[0] * consts.block_diag,) + grads[1:]

  want = jax.jit(autodiff)(*primals)
  got = jax.jit(lambda *p: cm.chunk_backward(*p, dy, dstate, consts, resets, layout))(*primals)
  for g, w in zip(got, want):
    assert relative_error(g, w) < 1e-5
