"""Text generation: a sequence-mode prefill, then a jitted `lax.while_loop` of one-token steps.

The decode loop carries the recurrent state (constant memory per token), the next logits,
the output buffer and the penalty counts. Rows of a batch are independent: prompts of
different lengths are left-padded and the state is reset at each row's first real token (or,
when an initial state is given, the ragged tail is fed through masked one-token steps), and a
row that hits a stop token stops emitting while the others continue.

The loop runs in blocks: each call of the compiled loop samples at most a block's worth of
tokens into a fresh [B, K] buffer (K = `block_size` when streaming, which hands each block's
new tokens to a callback, else up to `MAX_BLOCK`), so memory does not grow with
`max_new_tokens`, which may be anything up to `MAX_NEW_TOKENS` (the int32 step counter's range).

Every compiled function here is module-level and takes the weights as an argument: the only
cache is jax's own, keyed by shapes and the static sampling settings, so a fresh `Generator`
(what each `generate(model, ...)` makes) compiles nothing new for shapes seen before.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from goosejax.infer.prefill import prefill_split
from goosejax.infer.sampling import (GenerationError, SamplingConfig, apply_penalties, sample,
                                     update_counts)
from goosejax.infer.decode import DecodeWeights, decode_step_layers, decode_weights
from goosejax.model.rwkv7 import RWKV7
from goosejax.model.state import LayerStates, RWKV7State, join_state, split_state

PAD_ID = -1   # fills the output buffer where a row emitted nothing (stopped)
MAX_BLOCK = 1024   # tokens per call of the compiled loop without streaming
MAX_NEW_TOKENS = 2**31 - 1   # the step counter is int32


class DecodeCarry(NamedTuple):
  """Everything the decode loop carries from one token to the next."""
  step: jax.Array          # [] int32: tokens sampled so far
  budget: jax.Array        # [] int32: max_new_tokens, the most steps there will be
  tokens_BT: jax.Array     # [B, K] int32: this block's tokens (T: the block's steps), PAD_ID
                           # where nothing was emitted; each call of the loop starts it afresh
  lengths_B: jax.Array     # [B] int32: tokens emitted per row
  done_B: jax.Array        # [B] bool: row hit a stop token
  logits_BV: jax.Array     # [B, V] fp32: logits for the next token
  layers: LayerStates      # the recurrent state, split per layer (goosejax.model.state)
  seen_BV: jax.Array       # [B, V] bool: generated at least once (presence penalty)
  counts_BV: jax.Array     # [B, V] fp32: decayed occurrence counts (frequency penalty)
  key: jax.Array


def init_carry(logits_BV: jax.Array, state: RWKV7State, max_new_tokens: int,
               seed: int | jax.Array, block_len: int | None = None) -> DecodeCarry:
  """The carry before the first token; the buffer holds `block_len` tokens per call of the
  loop (default: all `max_new_tokens`)."""
  B, V = logits_BV.shape
  is_key = isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)
  key = seed if is_key else jax.random.key(seed)
  K = max_new_tokens if block_len is None else block_len
  return DecodeCarry(jnp.zeros((), jnp.int32), jnp.asarray(max_new_tokens, jnp.int32),
                     jnp.full((B, K), PAD_ID, jnp.int32),
                     jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool), logits_BV.astype(jnp.float32),
                     split_state(state), jnp.zeros((B, V), bool), jnp.zeros((B, V), jnp.float32), key)


def decode_loop(weights: DecodeWeights, carry: DecodeCarry, stop_at: jax.Array, cfg: SamplingConfig,
                stop_V: jax.Array, banned_V: jax.Array, occurrence_weight_V: jax.Array) -> DecodeCarry:
  """Sample tokens until `carry.step == stop_at`, the block buffer is full or every row is
  done (pure, jittable); the returned carry's buffer holds this call's tokens.

  stop_V / banned_V: [V] bool masks of the stop and banned tokens; occurrence_weight_V: [V].

  Each iteration samples from the carried logits, records the token, and runs the one-token
  step only if another token can follow (within the budget, some row still live), so no
  step is wasted after the last token and a later call with a larger `stop_at` continues.
  """
  first_step = carry.step
  carry = carry._replace(tokens_BT=jnp.full_like(carry.tokens_BT, PAD_ID))
  block_len = carry.tokens_BT.shape[1]

  def cond(c: DecodeCarry):
    return (c.step < stop_at) & (c.step - first_step < block_len) & ~jnp.all(c.done_B)

  def body(c: DecodeCarry) -> DecodeCarry:
    logits_BV = apply_penalties(c.logits_BV, c.seen_BV, c.counts_BV, banned_V, cfg)
    uniform_B = jax.random.uniform(jax.random.fold_in(c.key, c.step), (logits_BV.shape[0],))
    token_B = sample(logits_BV, uniform_B, cfg)
    stopped_B = stop_V[token_B]
    emit_B = ~c.done_B & ~stopped_B
    tokens_BT = jax.lax.dynamic_update_slice(
        c.tokens_BT, jnp.where(emit_B, token_B, PAD_ID)[:, None], (0, c.step - first_step))
    done_B = c.done_B | stopped_B
    seen_BV, counts_BV = update_counts(c.seen_BV, c.counts_BV, token_B, occurrence_weight_V,
                                       emit_B, cfg)
    step = c.step + 1
    more = (step < c.budget) & ~jnp.all(done_B)   # not stop_at: a later block continues
    logits_BV, layers = jax.lax.cond(
        more, lambda: decode_step_layers(weights, token_B, c.layers), lambda: (c.logits_BV, c.layers))
    return DecodeCarry(step, c.budget, tokens_BT, c.lengths_B + emit_B, done_B, logits_BV, layers,
                       seen_BV, counts_BV, c.key)

  return jax.lax.while_loop(cond, body, carry)


_decode_loop_jit = jax.jit(decode_loop, static_argnames="cfg", donate_argnames="carry")


@jax.jit
def _masked_steps(weights: DecodeWeights, tokens_BT, lengths_B, logits_BV, state):
  """Feed column t of `tokens_BT` to the rows with t < length; other rows keep their values."""
  def step(carry, t):
    logits_BV, layers = carry
    new_logits, new_layers = decode_step_layers(weights, tokens_BT[:, t], layers)
    active_B = t < lengths_B
    pick = lambda new, old: jnp.where(active_B.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return (pick(new_logits, logits_BV), jax.tree.map(pick, new_layers, layers)), None
  (logits_BV, layers), _ = jax.lax.scan(step, (logits_BV, split_state(state)),
                                        jnp.arange(tokens_BT.shape[1]))
  return logits_BV, join_state(layers)


class Generator:
  """Holds a model and its decode-layout weights (split per layer once, a copy of the
  weights) and generates from prompts. Code that generates repeatedly from the same weights
  keeps one; `generate(model, ...)` makes a fresh one per call (untransposed: no pass over
  the weights beyond a copy, see goosejax.infer.decode). Make a new one after changing the
  model's parameters: this one keeps the weights it was made with."""

  def __init__(self, model: RWKV7, transposed: bool = True):
    self.model = model
    self.weights = decode_weights(model, transposed)

  def _prefill(self, tokens_BT, state: RWKV7State, reset_BT=None):
    logits_BV, layers = prefill_split(self.weights, tokens_BT, split_state(state), reset_BT=reset_BT)
    return logits_BV, join_state(layers)

  def prefill(self, prompts: Sequence[Sequence[int]], state: RWKV7State | None = None):
    """(last logits [B, V], state after each row's prompt) for prompts of any lengths."""
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    T = int(lengths.max())
    fresh = state is None
    state = self.model.init_state(B) if fresh else _broadcast_state(state, B)
    if np.all(lengths == T):
      return self._prefill(jnp.asarray(np.array(prompts, np.int64), jnp.int32), state)
    if fresh:
      tokens = np.zeros((B, T), np.int32)
      reset = np.zeros((B, T), bool)
      for row, prompt in enumerate(prompts):
        tokens[row, T - len(prompt):] = prompt
        reset[row, T - len(prompt)] = True
      return self._prefill(jnp.asarray(tokens), state, jnp.asarray(reset))
    common = int(lengths.min())
    logits_BV, state = self._prefill(jnp.asarray([p[:common] for p in prompts], jnp.int32), state)
    tail = np.zeros((B, T - common), np.int32)
    for row, prompt in enumerate(prompts):
      tail[row, :len(prompt) - common] = prompt[common:]
    return _masked_steps(self.weights, jnp.asarray(tail), jnp.asarray(lengths - common, jnp.int32),
                         logits_BV, state)

  def generate(self, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, penalty_decay: float = 0.996,
               stop_ids: Sequence[int] = (), banned_ids: Sequence[int] = (), seed: int = 0,
               state: RWKV7State | None = None, occurrence_weights=None,
               callback: Callable | None = None, block_size: int = 8,
               return_state: bool = False):
    """See `goosejax.infer.generate`."""
    prompts, single = _normalize_prompts(prompt_ids, self.model.config.vocab_size)
    V = self.model.config.vocab_size
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if block_size < 1:
      raise GenerationError(f"block_size={block_size}: expected >= 1")
    cfg = SamplingConfig(float(temperature), float(top_p), int(top_k), float(presence_penalty),
                         float(frequency_penalty), float(penalty_decay)).validate()
    stop = _mask("stop_ids", stop_ids, V)
    banned = _mask("banned_ids", banned_ids, V)
    if bool(jnp.all(banned)):
      raise GenerationError(f"banned_ids bans all {V} tokens; nothing could be sampled")
    weight_V = _occurrence_weights(occurrence_weights, V)

    logits_BV, prompt_state = self.prefill(prompts, state)
    if max_new_tokens == 0:
      result = [] if single else [[] for _ in prompts]
      return (result, prompt_state) if return_state else result
    # The carry (donated to the loop) holds per-layer slices, not prompt_state's buffers.
    block_len = min(int(max_new_tokens), block_size if callback is not None else MAX_BLOCK)
    carry = init_carry(logits_BV, prompt_state, int(max_new_tokens), seed, block_len)
    run = functools.partial(_decode_loop_jit, self.weights, cfg=cfg, stop_V=stop,
                            banned_V=banned, occurrence_weight_V=weight_V)
    out: list[list[int]] = [[] for _ in prompts]
    while True:
      step = int(carry.step)
      if step >= max_new_tokens or bool(jnp.all(carry.done_B)):
        break
      carry = run(carry, stop_at=jnp.int32(min(step + block_len, max_new_tokens)))
      new = [row[row != PAD_ID].tolist() for row in np.asarray(carry.tokens_BT)]
      for row, ids in zip(out, new):
        row += ids
      if callback is not None and any(new) and callback(new[0] if single else new) is True:
        break      # the caller saw enough (e.g. a stop string in the decoded text)
    result = out[0] if single else out
    return (result, prompt_state) if return_state else result


def check_max_new_tokens(max_new_tokens) -> int:
  """max_new_tokens as an int, refusing what the step counter cannot count (before anything
  is allocated)."""
  number = isinstance(max_new_tokens, (int, float, np.integer, np.floating))
  whole = number and not isinstance(max_new_tokens, bool) and float(max_new_tokens).is_integer()
  if not whole or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
    raise GenerationError(f"max_new_tokens={max_new_tokens!r}: expected an integer from 0 to "
                          f"{MAX_NEW_TOKENS}")
  return int(max_new_tokens)


def _normalize_prompts(prompt_ids, vocab_size: int) -> tuple[list[list[int]], bool]:
  """A flat sequence of ids (one prompt) or a sequence of them / a 2-D array (a batch)."""
  if isinstance(prompt_ids, (np.ndarray, jax.Array)):
    array = np.asarray(prompt_ids)
    if array.ndim not in (1, 2):
      raise GenerationError(f"prompt_ids: expected a 1-D or 2-D array of token ids, got shape {array.shape}")
    single = array.ndim == 1
    prompts = [array.tolist()] if single else array.tolist()
  else:
    items = list(prompt_ids)
    single = all(isinstance(t, (int, np.integer)) for t in items)
    prompts = [items] if single else [list(p) for p in items]
  if not prompts:
    raise GenerationError("prompt_ids: expected at least one prompt")
  for row, prompt in enumerate(prompts):
    if not prompt:
      raise GenerationError(f"prompt_ids[{row}] is empty; every prompt needs at least one token "
                            "(start a fresh document with token 0)")
    _check_ids(f"prompt_ids[{row}]", prompt, vocab_size)
  return [[int(t) for t in p] for p in prompts], single


def _check_ids(name: str, ids: Sequence[int], vocab_size: int) -> list[int]:
  ids = [int(t) for t in ids]
  bad = [t for t in ids if not 0 <= t < vocab_size]
  if bad:
    raise GenerationError(f"{name} contains ids outside [0, {vocab_size}): {bad[:8]}")
  return ids


def _mask(name: str, ids: Sequence[int], vocab_size: int) -> jax.Array:
  mask = np.zeros(vocab_size, bool)
  mask[_check_ids(name, ids, vocab_size)] = True
  return jnp.asarray(mask)


def _occurrence_weights(weights, vocab_size: int) -> jax.Array:
  if weights is None:
    return jnp.ones((vocab_size,), jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (vocab_size,):
    raise GenerationError(f"occurrence_weights has shape {weights.shape}, expected ({vocab_size},)")
  return weights


def _broadcast_state(state: RWKV7State, batch: int) -> RWKV7State:
  have = state.wkv_LBHNN.shape[1]
  if have == batch:
    return state
  if have != 1:
    raise GenerationError(f"state has batch {have} but there are {batch} prompts; give a state of "
                          f"batch 1 (shared by every prompt) or batch {batch}")
  return jax.tree.map(lambda x: jnp.repeat(x, batch, axis=1), state)


def generate(model: RWKV7, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0, penalty_decay: float = 0.996,
             stop_ids: Sequence[int] = (), banned_ids: Sequence[int] = (), seed: int = 0, *,
             state: RWKV7State | None = None, occurrence_weights=None,
             callback: Callable | None = None, block_size: int = 8, return_state: bool = False):
  """Generate up to `max_new_tokens` new token ids after each prompt.

  prompt_ids: one prompt (a sequence of ints) or a batch (a sequence of sequences, lengths
    may differ, or a 2-D array). Returns the new ids in the same form: a list of ints, or a
    list of lists; stop tokens are not included.
  temperature=0: greedy. Sampling otherwise follows the official pipeline (see
    `goosejax.infer.sampling`): penalties, softmax, top_p, top_k, temperature.
  presence_penalty / frequency_penalty / penalty_decay: subtracted from the logits of tokens
    already generated, counts decaying by `penalty_decay` per step. `occurrence_weights` [V]:
    what one occurrence adds to a token's count (default 1; the official pipeline uses 0 for
    tokens that decode to whitespace or digits, see `official_occurrence_weights`).
  stop_ids end a row (not emitted); banned_ids are never sampled. seed: an int or a PRNG key.
  state: initial recurrent state (batch 1 is shared by all prompts), e.g. a cached prompt.
  callback: streaming; called with each block's new ids (same form as the result) every
    `block_size` tokens; returning True stops generation after that block.
  return_state: also return the state right after the prompts (prompt caching).

  Each call copies the weights into the per-layer decode layout (one copy, no compile after
  the first call for these shapes); a held `Generator(model)` keeps its copy, transposed for
  slightly faster decoding (README, "Inference speed").
  """
  return Generator(model, transposed=False).generate(
      prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
      penalty_decay=penalty_decay, stop_ids=stop_ids, banned_ids=banned_ids, seed=seed, state=state,
      occurrence_weights=occurrence_weights, callback=callback, block_size=block_size,
      return_state=return_state)


def official_occurrence_weights(decode: Callable[[list[int]], str], vocab_size: int) -> np.ndarray:
  """The official pipeline's per-token occurrence weight: 0 where the token decodes to a
  substring of ' \\t0123456789' (as its `ttt in ' \\t0123456789'` test), else 1."""
  weights = np.ones(vocab_size, np.float32)
  for token in range(vocab_size):
    try:
      text = decode([token])
    except (UnicodeDecodeError, ValueError, KeyError, IndexError):
      continue
    if text in " \t0123456789":
      weights[token] = 0.0
  return weights
