"""Official RWKV-7 initialisation: RWKV-LM train_temp's since 2025-05-06
(docs/architecture.md#initialisation-and-optimizer).

Every helper returns arrays for all layers at once, stacked on a leading L axis. Orthogonal
matrices are drawn in fp32 (bf16 QR is inaccurate) in the official [out, in] orientation and
then transposed to goosejax's [in, out] storage.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


class LayerRatios:
  """The per-layer and per-channel ramps the official init is written in.

  Shapes: layer quantities are [L, 1], channel quantities [C]; products broadcast to [L, C].
  """

  def __init__(self, n_layer: int, n_embd: int, head_size: int):
    layer = np.arange(n_layer, dtype=np.float64)[:, None]
    channel = np.arange(n_embd, dtype=np.float64)
    self.r01 = layer / max(n_layer - 1, 1)        # 0 -> 1 across layers
    self.r10 = 1.0 - layer / n_layer              # 1 -> almost 0 across layers
    self.ddd = channel / n_embd
    self.lin = channel / max(n_embd - 1, 1) - 0.5
    half = (head_size - 1) / 2
    q = ((channel % head_size) - half) / half
    self.zz = q * np.abs(q)
    self.www = -6 + 6 * (channel / max(n_embd - 1, 1)) ** (1 + self.r01**0.3)

  def shift_mix(self, power_of_r10) -> np.ndarray:
    """1 - ddd ** power, the token-shift lerp coefficients."""
    return 1.0 - self.ddd ** power_of_r10


# Gains of RWKV-LM's generate_init_weight (train_temp/src/model.py @524481d, lines 914-963):
# every 2-D `.weight` is orthogonal with gain 1.0, except att.key (0.1), att.output and
# ffn.value (0), the head (below) and emb (uniform +-1e-4). No sqrt(out/in) factor for tall
# matrices there: that factor (RWKV-5/6 era) survives only in the LoRA `ortho_init`, where
# the matrices are wide.
LINEAR_GAINS = {"att.receptance": 1.0, "att.key": 0.1, "att.value": 1.0, "att.output": 0.0,
                "ffn.key": 1.0, "ffn.value": 0.0}
EMBEDDING_RANGE = 1e-4


def head_gain(vocab_size: int, n_embd: int) -> float:
  """0.5 * sqrt(V / C) when V > C, else 0.5 (generate_init_weight, lines 927-933)."""
  return 0.5 * (vocab_size / n_embd) ** 0.5 if vocab_size > n_embd else 0.5


@functools.partial(jax.jit, static_argnames=("count", "shape"))
def _orthogonal_draws(key: jax.Array, gain: jax.Array, count: int, shape: tuple[int, int]) -> jax.Array:
  """[count, *shape] orthogonal matrices times `gain`, in fp32 (bf16 QR is inaccurate).

  Jitted so that a second model of the same sizes in one process (tests, notebooks, a
  resumed run) reuses the compiled draw instead of compiling it again.
  lax.map, not vmap: a batched QR inside jit can deadlock the CPU thread pool (2 cores)."""
  draw = jax.nn.initializers.orthogonal()
  return gain * jax.lax.map(lambda k: draw(k, shape, jnp.float32), jax.random.split(key, count))


def orthogonal_stack(key: jax.Array, n_layer: int, out_dim: int, in_dim: int, gain: float,
                     dtype) -> jax.Array:
  """[L, in, out] = transposes of L orthogonal [out, in] matrices scaled by `gain`
  (torch.nn.init.orthogonal_ on the official [out, in] weight)."""
  if gain == 0:
    return jnp.zeros((n_layer, in_dim, out_dim), dtype)
  mats = _orthogonal_draws(key, jnp.float32(gain), n_layer, (out_dim, in_dim))
  return jnp.swapaxes(mats, -1, -2).astype(dtype)


def lora_up_stack(key: jax.Array, n_layer: int, rank: int, n_embd: int, dtype) -> jax.Array:
  """The LoRA up-projections (w2, a2, v2, g2): [L, rank, C] with orthonormal rows, gain 0.1
  (RWKV_Tmix_x070's ortho_init, lines 524-565: rank < C, so its sqrt factor is 1)."""
  return _orthogonal_draws(key, jnp.float32(0.1), n_layer, (rank, n_embd)).astype(dtype)
