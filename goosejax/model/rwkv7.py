"""The RWKV-7 (x070) language model: embedding, L stacked blocks run by `lax.scan` (each
layer under a `run.remat` policy, goosejax.model.remat), head.

The pieces are also callable one by one, for code that holds the weights another way (the
decoder keeps one `Blocks` per layer, see goosejax.infer.decode): `embed`, `Blocks` on one
layer's weights, `run_layers` (the layers unrolled), `layer_norm` and `head_logits`. There
is no other copy of the model's math.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from goosejax import sharding
from goosejax.config import ModelConfig
from goosejax.config.schema import Remat
from goosejax.model import init, remat
from goosejax.model.channel_mix import ChannelMix
from goosejax.model.layers import matmul
from goosejax.model.norms import LayerNorm, layer_norm
from goosejax.model.state import LayerStates, RWKV7State, zeros_state
from goosejax.model.time_mix import TimeMix
from goosejax.sharding import previous_tokens
from goosejax.wkv import self_check
from goosejax.wkv.dispatch import kernel_chunk_sizes


def shift_tokens(x_BTC: jax.Array, last_B1C: jax.Array, reset_BT: jax.Array | None) -> jax.Array:
  """Each position's previous input: [last, x_0, ..., x_{T-2}], zeros where a document starts
  (across devices when the ambient mesh splits T over `sequence`)."""
  prev_BTC = previous_tokens(x_BTC, last_B1C)
  if reset_BT is not None:
    prev_BTC = jnp.where(reset_BT[..., None], 0, prev_BTC)
  return prev_BTC


def embed(tokens_BT: jax.Array, emb_VC: jax.Array, ln0_weight_C: jax.Array, ln0_bias_C: jax.Array,
          dtype) -> jax.Array:
  """The tokens' embedding rows in the compute dtype, through ln0: [B, T, C]."""
  return layer_norm(jnp.take(emb_VC, tokens_BT, axis=0).astype(dtype), ln0_weight_C, ln0_bias_C)


def head_logits(x: jax.Array, head_CV: jax.Array) -> jax.Array:
  """The head on ln_out's output: fp32 logits [..., V] (head_CV may be `Transposed`, see `matmul`)."""
  return matmul(x, head_CV, jnp.float32)


class Blocks(nnx.Module):
  """All L residual blocks; every parameter has a leading [L] axis.

  Inside the layer scan the parameters are sliced to one layer and `__call__` runs that
  layer: x + TimeMix(ln1(x)), then + ChannelMix(ln2(x)). A `Blocks` holding one layer's
  weights (no [L] axis) runs that layer the same way (`run_layers`).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    ratios = init.LayerRatios(cfg.n_layer, cfg.n_embd, cfg.head_size)
    pdt = jnp.dtype(cfg.param_dtype)
    self.ln1 = LayerNorm(cfg.n_embd, stack=(cfg.n_layer,), param_dtype=pdt)
    self.att = TimeMix(cfg, ratios, rngs=rngs)
    self.ln2 = LayerNorm(cfg.n_embd, stack=(cfg.n_layer,), param_dtype=pdt)
    self.ffn = ChannelMix(cfg, ratios, rngs=rngs)

  def __call__(self, x_BTC, v_first_BTC, att_shift_BC, wkv_BHNN, ffn_shift_BC, is_first_layer,
               reset_BT):
    # The residual stream stays split by batch (and length) only: each matmul's output then
    # has one known layout under any mesh (no-ops without one).
    x_BTC = remat.tag(sharding.constrain(x_BTC, sharding.RESIDUAL_AXES), remat.BLOCK_IN)
    xa_BTC, prev_BTC = self.time_mix_inputs(x_BTC, att_shift_BC, reset_BT)
    dx_BTC, wkv_BHNN, v_first_BTC = self.att(xa_BTC, prev_BTC, wkv_BHNN, v_first_BTC,
                                             is_first_layer, reset_BT)
    x_BTC = sharding.constrain(x_BTC + dx_BTC, sharding.RESIDUAL_AXES)
    xf_BTC = self.ln2(x_BTC)
    x_BTC = x_BTC + self.ffn(xf_BTC, shift_tokens(xf_BTC, ffn_shift_BC[:, None], reset_BT))
    x_BTC = sharding.constrain(x_BTC, sharding.RESIDUAL_AXES)
    return x_BTC, v_first_BTC, (xa_BTC[:, -1], wkv_BHNN, xf_BTC[:, -1])

  def time_mix_inputs(self, x_BTC, att_shift_BC, reset_BT):
    """(ln1 output, the previous token's ln1 output) of the block input x_BTC."""
    xa_BTC = self.ln1(x_BTC)
    return xa_BTC, shift_tokens(xa_BTC, att_shift_BC[:, None], reset_BT)

  def first_value(self, x_BTC, att_shift_BC, reset_BT):
    """`v_first`, on layer 0's weights: that layer's value projection of its input x_BTC, by
    the code the layer runs, in the compute dtype."""
    x_BTC = sharding.constrain(x_BTC, sharding.RESIDUAL_AXES)
    return self.att.value_of(*self.time_mix_inputs(x_BTC, att_shift_BC, reset_BT))


def run_layers(layers: Sequence[Blocks], x_BTC: jax.Array, states: LayerStates,
               reset_BT: jax.Array | None = None) -> tuple[jax.Array, LayerStates]:
  """The residual blocks unrolled, `layers[i]` a `Blocks` holding layer i's weights, on
  per-layer states ((att_shift_BC, wkv_BHNN, ffn_shift_BC), ...): (x_BTC, new states).

  The same layers as `RWKV7.hidden_states`'s scan, without slicing stacked weights: the
  decoder (T = 1) and prefill run this on weights split per layer once. The states enter in
  the compute dtype (the WKV state in fp32) and leave in the dtypes they came in.
  """
  dtype = x_BTC.dtype
  v_first_BTC = jnp.zeros_like(x_BTC)
  new_states = []
  # One kernel self-check for all the unrolled layers (where the caller installed none), not
  # one per layer's WKV call (goosejax.wkv.self_check).
  time_mix = layers[0].att
  checks = self_check.checks_for(kernel_chunk_sizes(time_mix.wkv_impl, time_mix.wkv_chunk_size))
  with self_check.use(checks):
    for i, (block, (att_shift_BC, wkv_BHNN, ffn_shift_BC)) in enumerate(zip(layers, states, strict=True)):
      x_BTC, v_first_BTC, (att, wkv, ffn) = block(
          x_BTC, v_first_BTC, att_shift_BC.astype(dtype), wkv_BHNN.astype(jnp.float32),
          ffn_shift_BC.astype(dtype), i == 0, reset_BT)
      new_states.append((att.astype(att_shift_BC.dtype), wkv, ffn.astype(ffn_shift_BC.dtype)))
  return x_BTC, tuple(new_states)


def run_stacked(graphdef: nnx.GraphDef, policy: Remat, x_BTC: jax.Array, stacked_xs,
                reset_BT: jax.Array | None) -> tuple[jax.Array, tuple]:
  """The L blocks on weights and states stacked [L, ...], one `lax.scan`: `stacked_xs` is
  (the `Blocks` state split off `graphdef`, att_shift_LBC, wkv_LBHNN, ffn_shift_LBC); returns
  (x_BTC, the three new states stacked), each layer under the remat `policy`
  (goosejax.model.remat).

  `v_first` is computed before the scan (layer 0's ln1, token shift and value projection, once
  more than layer 0 itself runs them) and read by every layer as a constant: carried through
  the scan instead, the backward would keep a copy per layer. Layer 0 uses its own value.
  """
  first_block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked_xs[0]))
  # Not under jax.checkpoint: its few [B, T, C] intermediates are kept once, and a remat
  # outside the scan let XLA:TPU defer the head's weight gradient past the layers' backward,
  # holding the fp32 logits through it (1.5B, v6e:2x2, L8: 10.3 GiB of temporaries, not 6.7).
  v_first_BTC = first_block.first_value(x_BTC, stacked_xs[1][0], reset_BT)

  def layer(x_BTC, v_first_BTC, layer_xs):
    layer_params, att_shift_BC, wkv_BHNN, ffn_shift_BC, layer_index = layer_xs
    block = nnx.merge(graphdef, layer_params)
    x_BTC, _, new_states = block(x_BTC, v_first_BTC, att_shift_BC, wkv_BHNN, ffn_shift_BC,
                                 layer_index == 0, reset_BT)
    return x_BTC, new_states

  layer = remat.checkpointed(layer, policy)
  n_layer = stacked_xs[1].shape[0]
  return jax.lax.scan(lambda x_BTC, layer_xs: layer(x_BTC, v_first_BTC, layer_xs), x_BTC,
                      (*stacked_xs, jnp.arange(n_layer)))


class RWKV7(nnx.Module):
  """RWKV-7 "Goose": `model(tokens_BT, state=None, *, reset_BT=None) -> (logits_BTV, state)`.

  T = 1 is RNN mode; splitting a sequence across calls with the returned state gives the same
  logits as one call. `reset_BT` marks document starts: there the WKV state and both token
  shifts see zeros, exactly as at the start of a fresh sequence. Logits are fp32.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: Remat = "none"):
    cfg.validate()
    self.config = cfg
    self.remat = remat
    V, C = cfg.vocab_size, cfg.n_embd
    pdt = jnp.dtype(cfg.param_dtype)
    self.emb = nnx.Param(jax.random.uniform(rngs.params(), (V, C), jnp.float32, -init.EMBEDDING_RANGE,
                                            init.EMBEDDING_RANGE).astype(pdt))
    self.ln0 = LayerNorm(C, param_dtype=pdt)
    self.blocks = Blocks(cfg, rngs=rngs)
    self.ln_out = LayerNorm(C, param_dtype=pdt)
    self.head = nnx.Param(init.orthogonal_stack(rngs.params(), 1, V, C, init.head_gain(V, C), pdt)[0])

  @property
  def compute_dtype(self):
    return jnp.dtype(self.config.dtype)

  def init_state(self, batch_size: int) -> RWKV7State:
    cfg = self.config
    return zeros_state(cfg.n_layer, batch_size, cfg.n_embd, cfg.n_head, cfg.head_size,
                       self.compute_dtype)

  def __call__(self, tokens_BT: jax.Array, state: RWKV7State | None = None, *,
               reset_BT: jax.Array | None = None) -> tuple[jax.Array, RWKV7State]:
    x_BTC, state = self.hidden_states(tokens_BT, state, reset_BT=reset_BT)
    return self.logits(x_BTC), state

  def logits(self, x_BTC: jax.Array) -> jax.Array:
    """The head applied to `hidden_states` output: fp32 logits [..., V]."""
    return head_logits(x_BTC, self.head[...])

  def hidden_states(self, tokens_BT: jax.Array, state: RWKV7State | None = None, *,
                    reset_BT: jax.Array | None = None) -> tuple[jax.Array, RWKV7State]:
    """Everything but the head: (ln_out output [B,T,C] in the compute dtype, new state).

    Prefill uses this to apply the head to the last position only.
    """
    if tokens_BT.ndim != 2:
      raise ValueError(f"RWKV7: tokens must be [batch, time], got shape {tokens_BT.shape}")
    B, T = tokens_BT.shape
    if state is None:
      state = self.init_state(B)
    if reset_BT is not None:
      if reset_BT.shape != (B, T):
        raise ValueError(f"RWKV7: reset_BT has shape {reset_BT.shape}, expected {(B, T)}")
      reset_BT = reset_BT.astype(bool)
    dtype = self.compute_dtype
    x_BTC = embed(tokens_BT, self.emb[...], self.ln0.weight[...], self.ln0.bias[...], dtype)

    graphdef, params = nnx.split(self.blocks)
    x_BTC, states = run_stacked(graphdef, self.remat, x_BTC, (
        params, state.att_shift_LBC.astype(dtype), state.wkv_LBHNN.astype(jnp.float32),
        state.ffn_shift_LBC.astype(dtype)), reset_BT)
    return self.ln_out(x_BTC), RWKV7State(*states)
