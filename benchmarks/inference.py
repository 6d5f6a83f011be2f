"""Inference speed: goosejax vs the official `rwkv` runtime, side by side, on the same weights,
and goosejax's decode against the machine's limit.

    python benchmarks/inference.py                    # 0.1B shape (L12 D768 V65536), fp32, CPU
    python benchmarks/inference.py --no-official      # goosejax only (no torch / rwkv needed)

Measures, for one random 0.1B-shaped model in fp32:
  decode b1    batch-1 greedy decoding, tokens/s (goosejax: the jitted while-loop of one-token
               steps; official: forward([token], state) per token, argmax in between)
  gemv chain   the machine's limit for decoding: a jitted chain of fp32 matrix-vector
               products over the same matrix shapes as the model (every layer's linear and
               LoRA matrices, then the head), in three forms: matrices stored [in, out] and
               [out, in] as plain dot_generals, and [out, in] used through their transposed
               view (XLA:CPU fuses that into a loop, what goosejax's decoding runs); its
               weight bandwidth is matrix bytes / seconds, the fastest form's counts
  prefill      a 512-token prompt from a zero state to the first token's logits, tokens/s
               (goosejax: the sequence-mode prefill generate() runs; official: forward(tokens, None))
  decode b64   batch-64 greedy decoding, tokens/s (goosejax only; the official runtime has none)
Batch-1 decoding reads every weight once per token, so its weight bandwidth is
(bytes of the weights a token reads: every parameter but the embedding, plus one embedding
row) x tokens/s; the table compares that with the gemv chain's.
The rounds alternate between the runtimes and the chain so that all see the same machine
load (a chain round runs as many chains as a decode round decodes tokens, and reports their
mean); the table reports each one's best round (the least disturbed) and the median, and the
ratios of the best rounds and of the medians. On a shared machine, compare ratios, not
absolute numbers.
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
    from goosejax.model.params import load_param_dict, param_dict

    cfg, params = official_to_params(state_dict)
    self.model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
    load_param_dict(self.model, params)
    self.generator = Generator(self.model)
    self.jax, self.jnp = jax, jnp
    params = param_dict(self.model)
    emb = params.pop("emb")
    # What one batch-1 token reads: every weight once, and one row of the embedding.
    self.bytes_per_token = sum(p.nbytes for p in params.values()) + emb.nbytes // emb.shape[0]
    # The matrices, in the order a token reads them: [in, out] shapes of the gemv chain.
    L = cfg.n_layer
    layer_mats = [name for name, p in params.items() if name.startswith("blocks.") and p.ndim == 3]
    self.matrix_shapes = [tuple(params[name].shape[1:]) for _ in range(L) for name in layer_mats]
    self.matrix_shapes.append(tuple(params["head"].shape))

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
    self.jax.block_until_ready(carry.tokens_BT)
    return time.perf_counter() - start

  def prefill(self, tokens: list[int]) -> float:
    """Seconds from a prompt to its last logits (what generate() runs first)."""
    start = time.perf_counter()
    self.jax.block_until_ready(self.generator.prefill([tokens])[0])
    return time.perf_counter() - start


class GemvChain:
  """A jitted chain of fp32 matrix-vector products, each one's input made from the previous
  one's output (so they run one after another, as a decode step's do), over matrices of the
  given [in, out] shapes. form: "in_out" (stored [in, out]), "out_in" (stored [out, in],
  contracted on axis 1), "out_in_view" (stored [out, in], multiplied as x @ w.T)."""
  FORMS = ("in_out", "out_in", "out_in_view")

  def __init__(self, shapes, form: str):
    import jax
    import jax.numpy as jnp

    self.jax = jax
    keys = jax.random.split(jax.random.key(0), len(shapes))
    stored = [(i, o) if form == "in_out" else (o, i) for i, o in shapes]
    self.mats = [jax.random.normal(key, shape, jnp.float32) * 0.02 for key, shape in zip(keys, stored)]
    self.bytes = sum(m.nbytes for m in self.mats)
    highest = jax.lax.Precision.HIGHEST

    def product(x, w):
      if form == "in_out":
        return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=highest)
      if form == "out_in":
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=highest)
      return jnp.matmul(x, w.T, precision=highest)

    @jax.jit
    def chain(mats, x):
      for w in mats:
        n_in = w.shape[0 if form == "in_out" else 1]
        x_in = jnp.resize(x, (1, n_in))      # the previous output, cut or repeated to fit
        x = jnp.tanh(product(x_in, w))
      return x

    self.chain = chain
    self.x = jnp.ones((1, shapes[0][0]), jnp.float32)
    self.run()

  def run(self, repeats: int = 1) -> float:
    """Seconds per chain, averaged over `repeats` chains run back to back."""
    start = time.perf_counter()
    for _ in range(repeats):
      self.jax.block_until_ready(self.chain(self.mats, self.x))
    return (time.perf_counter() - start) / repeats


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
  chains = {form: GemvChain(ours.matrix_shapes, form) for form in GemvChain.FORMS}
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
    for form, chain in chains.items():   # as many chains as a decode round has tokens
      record(f"gemv chain {form}", chain.run(args.decode_tokens))
    record("goosejax prefill", ours.prefill(prompt) / args.prefill_tokens)
    if theirs is not None:
      record("official prefill", theirs.prefill(prompt) / args.prefill_tokens)
  if args.batch:
    for _ in range(max(2, args.rounds // 2)):
      record(f"goosejax decode b{args.batch}",
             ours.decode(args.batch, args.decode_tokens) / (args.decode_tokens * args.batch))

  best = {name: min(values) for name, values in times.items()}
  median = {name: statistics.median(values) for name, values in times.items()}
  print(f"\n{'':24s} {'best tok/s':>11s} {'median tok/s':>13s}")
  for name in times:
    if not name.startswith("gemv"):
      print(f"{name:24s} {1 / best[name]:11.1f} {1 / median[name]:13.1f}")
  if theirs is not None:
    for what in ("decode b1", "prefill"):
      print(f"ratio goosejax/official {what}: {best[f'official {what}'] / best[f'goosejax {what}']:.2f}x "
            f"(best rounds), {median[f'official {what}'] / median[f'goosejax {what}']:.2f}x (medians)")

  # Weight bandwidth: decode b1 against the gemv chain (its fastest form).
  gb = lambda nbytes, seconds: nbytes / seconds / 1e9
  print(f"\nweight bandwidth, GB/s {'best':>8s} {'median':>8s}")
  ours_bw = {kind: gb(ours.bytes_per_token, stat["goosejax decode b1"])
             for kind, stat in (("best", best), ("median", median))}
  print(f"goosejax decode b1     {ours_bw['best']:8.2f} {ours_bw['median']:8.2f}   "
        f"({ours.bytes_per_token / 1e6:.1f} MB of weights per token)")
  chain_bw = {"best": 0.0, "median": 0.0}
  for form, chain in chains.items():
    bw = {kind: gb(chain.bytes, stat[f"gemv chain {form}"]) for kind, stat in
          (("best", best), ("median", median))}
    chain_bw = {kind: max(chain_bw[kind], bw[kind]) for kind in bw}
    print(f"gemv chain {form:11s} {bw['best']:8.2f} {bw['median']:8.2f}   "
          f"({chain.bytes / 1e6:.1f} MB of matrices)")
  bandwidth_ratio = {kind: ours_bw[kind] / chain_bw[kind] for kind in ours_bw}
  print(f"ratio goosejax decode b1 / gemv chain bandwidth: {bandwidth_ratio['best']:.0%} "
        f"(best rounds), {bandwidth_ratio['median']:.0%} (medians)")
  targets = [("decode b1 >= 85% of the gemv chain's bandwidth", bandwidth_ratio, 0.85)]
  if theirs is not None:
    for what, factor in (("decode b1", 1.0), ("prefill", 2.0)):
      ratio = {"best": best[f"official {what}"] / best[f"goosejax {what}"],
               "median": median[f"official {what}"] / median[f"goosejax {what}"]}
      targets.append((f"{what} >= {factor:g}x the official runtime", ratio, factor))
  for name, ratio, bound in targets:
    verdict = {kind: "met" if value >= bound else "missed" for kind, value in ratio.items()}
    print(f"target {name}: {verdict['best']} (best rounds), {verdict['median']} (medians)")
  print(f"load average {os.getloadavg()[0]:.2f} at the end")
  return 0


if __name__ == "__main__":
  sys.exit(main())
