"""Inference speed: goosejax vs the official `rwkv` runtime, side by side, on the same weights.

    python benchmarks/inference.py                    # 0.1B shape (L12 D768 V65536), fp32, CPU
    python benchmarks/inference.py --no-official      # goosejax only (no torch / rwkv needed)

Measures, for one random 0.1B-shaped model in fp32:
  decode b1    batch-1 greedy decoding, tokens/s (goosejax: the jitted while-loop of one-token
               steps; official: forward([token], state) per token, argmax in between)
  prefill      a 512-token prompt from a zero state to the first token's logits, tokens/s
               (goosejax: the sequence-mode prefill generate() runs; official: forward(tokens, None))
  decode b64   batch-64 greedy decoding, tokens/s (goosejax only; the official runtime has none)
The rounds alternate between the two runtimes so that both see the same machine load; the
table reports each one's best round (the least disturbed) and the median, and the ratios of
the best rounds. On a shared machine, compare ratios, not absolute numbers.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--vocab", type=int, default=65536)
  p.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode round")
  p.add_argument("--prefill-tokens", type=int, default=512)
  p.add_argument("--batch", type=int, default=64, help="batch of the batched decode (0: skip)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--no-official", action="store_true", help="skip the official runtime")
  return p


def random_state_dict(n_layer: int, n_embd: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Official-layout fp32 weights of the given shape (values do not matter for speed)."""
  from goosejax.config import ModelConfig
  from goosejax.convert.official import expected_official_shapes

  cfg = ModelConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd)
  rng = np.random.default_rng(seed)
  return {key: (0.02 * rng.standard_normal(shape)).astype(np.float32)
          for key, shape in expected_official_shapes(cfg).items()}


class Goosejax:
  def __init__(self, state_dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from goosejax.convert.official import official_to_params
    from goosejax.infer.generate import Generator
    from goosejax.model import RWKV7
    from goosejax.model.params import load_param_dict

    cfg, params = official_to_params(state_dict)
    self.model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
    load_param_dict(self.model, params)
    self.generator = Generator(self.model)
    self.jax, self.jnp = jax, jnp

  def decode(self, batch: int, tokens: int) -> float:
    """Seconds for `tokens` greedy steps of `batch` rows (the compiled loop only)."""
    from goosejax.infer.generate import _decode_loop_jit, init_carry
    from goosejax.infer.sampling import SamplingConfig

    jnp = self.jnp
    V = self.model.config.vocab_size
    logits, state = self.generator.prefill([[0]] * batch)
    no_tokens = jnp.zeros((V,), bool)
    carry = self.jax.block_until_ready(init_carry(logits, state, tokens, 0))
    start = time.perf_counter()
    carry = _decode_loop_jit(self.generator.weights, carry, jnp.int32(tokens), SamplingConfig(0.0),
                             no_tokens, no_tokens, jnp.ones((V,), jnp.float32))
    self.jax.block_until_ready(carry.tokens_BN)
    return time.perf_counter() - start

  def prefill(self, tokens: list[int]) -> float:
    """Seconds from a prompt to its last logits (what generate() runs first)."""
    start = time.perf_counter()
    self.jax.block_until_ready(self.generator.prefill([tokens])[0])
    return time.perf_counter() - start


class Official:
  def __init__(self, state_dict):
    os.environ["RWKV_V7_ON"] = "1"
    import torch
    from rwkv.model import RWKV

    self.torch = torch
    with tempfile.TemporaryDirectory() as tmp:
      torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, f"{tmp}/model.pth")
      self.model = RWKV(model=f"{tmp}/model", strategy="cpu fp32")

  def decode(self, tokens: int) -> float:
    with self.torch.no_grad():
      logits, state = self.model.forward([0], None)
      start = time.perf_counter()
      for _ in range(tokens):
        logits, state = self.model.forward([int(self.torch.argmax(logits))], state)
      return time.perf_counter() - start

  def prefill(self, tokens: list[int]) -> float:
    with self.torch.no_grad():
      start = time.perf_counter()
      self.model.forward(tokens, None)
      return time.perf_counter() - start


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
        f"at start; model L{args.layers} D{args.width} V{args.vocab} fp32", flush=True)
  state_dict = random_state_dict(args.layers, args.width, args.vocab)
  ours = Goosejax(state_dict)
  theirs = None if args.no_official else Official(state_dict)
  prompt = [int(t) for t in np.random.default_rng(1).integers(0, args.vocab, args.prefill_tokens)]

  # Warm-up: compile every shape once and let the official TorchScript functions specialise.
  ours.decode(1, args.decode_tokens)
  ours.prefill(prompt)
  if args.batch:
    ours.decode(args.batch, 4)
  if theirs is not None:
    theirs.decode(4)
    theirs.prefill(prompt)

  times: dict[str, list[float]] = {}
  record = lambda name, seconds: times.setdefault(name, []).append(seconds)
  for _ in range(args.rounds):
    record("goosejax decode b1", ours.decode(1, args.decode_tokens) / args.decode_tokens)
    if theirs is not None:
      record("official decode b1", theirs.decode(args.decode_tokens) / args.decode_tokens)
    record("goosejax prefill", ours.prefill(prompt) / args.prefill_tokens)
    if theirs is not None:
      record("official prefill", theirs.prefill(prompt) / args.prefill_tokens)
  if args.batch:
    for _ in range(max(2, args.rounds // 2)):
      record(f"goosejax decode b{args.batch}",
             ours.decode(args.batch, args.decode_tokens) / (args.decode_tokens * args.batch))

  best = {name: min(values) for name, values in times.items()}
  print(f"\n{'':24s} {'best tok/s':>11s} {'median tok/s':>13s}")
  for name, values in times.items():
    print(f"{name:24s} {1 / best[name]:11.1f} {1 / statistics.median(values):13.1f}")
  if theirs is not None:
    for what in ("decode b1", "prefill"):
      ratio = best[f"official {what}"] / best[f"goosejax {what}"]
      median = statistics.median(times[f"official {what}"]) / statistics.median(times[f"goosejax {what}"])
      print(f"ratio goosejax/official {what}: {ratio:.2f}x (best rounds), {median:.2f}x (medians)")
  print(f"load average {os.getloadavg()[0]:.2f} at the end")
  return 0


if __name__ == "__main__":
  sys.exit(main())
