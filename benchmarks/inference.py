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
  repeated calls  the documented one-call API repeated, goosejax.generate(model, prompt, 4,
               temperature=0) on the 512-token prompt, against the same call through a held,
               warmed Generator(model): ms per call and their ratio
  batch sweep  greedy decoding at batch 1, 2, 4, ..., 256 (--batches), tokens/s, against the
               machine's roofline for that batch measured in the same run: batch / max(weight
               bytes / the gemv chain's bandwidth, matmul FLOPs per token x batch / the FLOP
               rate of the same chain of matrices at batch 256 (a gemm chain)); the official
               runtime decodes one sequence at a time, so it appears at batch 1 only
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
  p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256",
                 help="batch sizes of the decode sweep, comma-separated ('' to skip)")
  p.add_argument("--sweep-tokens", type=int, default=8, help="tokens per sweep round")
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

  def generate_calls(self, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """Seconds per call of the documented one-call API and of a held Generator's, alternating."""
    import goosejax

    calls = {"goosejax.generate(model, ...)":
                 lambda: goosejax.generate(self.model, prompt, new_tokens, temperature=0),
             "held Generator(model).generate":
                 lambda: self.generator.generate(prompt, new_tokens, temperature=0)}
    for call in calls.values():   # compile both paths first
      call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
      for name, call in calls.items():
        start = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - start)
    return times

  def prefill(self, tokens: list[int]) -> float:
    """Seconds from a prompt to its last logits (what generate() runs first)."""
    start = time.perf_counter()
    self.jax.block_until_ready(self.generator.prefill([tokens])[0])
    return time.perf_counter() - start


class GemvChain:
  """A jitted chain of fp32 matrix-vector products, each one's input made from the previous
  one's output (so they run one after another, as a decode step's do), over matrices of the
  given [in, out] shapes. form: "in_out" (stored [in, out]), "out_in" (stored [out, in],
  contracted on axis 1), "out_in_view" (stored [out, in], multiplied as x @ w.T). With
  rows > 1 the products are matrix-matrix (a gemm chain: the machine's FLOP rate)."""
  FORMS = ("in_out", "out_in", "out_in_view")

  def __init__(self, shapes, form: str, rows: int = 1):
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
        x_in = jnp.resize(x, (x.shape[0], n_in))   # the previous output, cut or repeated
        x = jnp.tanh(product(x_in, w))
      return x

    self.chain = chain
    self.x = jnp.ones((rows, shapes[0][0]), jnp.float32)
    self.flops = 2 * rows * sum(i * o for i, o in shapes)
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
  report_repeated_calls(ours.generate_calls(prompt, 4, args.rounds), len(prompt))
  batches = [int(b) for b in args.batches.split(",") if b.strip()]
  if batches:
    batch_sweep(ours, chains, batches, args.sweep_tokens, max(2, args.rounds // 2))
  print(f"load average {os.getloadavg()[0]:.2f} at the end")
  return 0


def report_repeated_calls(times: dict[str, list[float]], prompt_tokens: int) -> None:
  print(f"\nrepeated calls, {prompt_tokens}-token prompt, 4 new tokens, greedy: ms per call "
        "(best / median)")
  for name, values in times.items():
    print(f"{name:32s} {1e3 * min(values):8.0f} {1e3 * statistics.median(values):8.0f}")
  (one, held) = times.values()
  print(f"ratio one-call / held: {min(one) / min(held):.2f}x (best), "
        f"{statistics.median(one) / statistics.median(held):.2f}x (median)")


def batch_sweep(ours: Goosejax, gemv_chains: dict, batches: list[int], tokens: int,
                rounds: int) -> None:
  """Decode tokens/s per batch size against the roofline measured alongside (module doc)."""
  gemm = GemvChain(ours.matrix_shapes, "in_out", rows=max(batches))
  matmul_flops_per_token = gemm.flops // max(batches)
  bandwidth, flop_rate, decode = 0.0, 0.0, {}
  for batch in batches:
    ours.decode(batch, 2)                                 # compile this batch size
    for _ in range(rounds):
      seconds = ours.decode(batch, tokens) / tokens       # per step of `batch` tokens
      decode[batch] = max(decode.get(batch, 0.0), batch / seconds)
      # The roofline's two rates, measured between the decode rounds (same machine load).
      bandwidth = max([bandwidth] + [c.bytes / c.run(tokens) for c in gemv_chains.values()])
      flop_rate = max(flop_rate, gemm.flops / gemm.run(1))
  print(f"\nbatch sweep (best of {rounds} rounds of {tokens} steps); roofline from the gemv "
        f"chain's {bandwidth / 1e9:.1f} GB/s and the gemm chain's {flop_rate / 1e9:.1f} GFLOP/s")
  print(f"{'batch':>5s} {'tok/s':>9s} {'roofline':>9s} {'of roofline':>11s}  bound")
  for batch, tokens_per_s in decode.items():
    weight_time = ours.bytes_per_token / bandwidth
    flop_time = matmul_flops_per_token * batch / flop_rate
    roofline = batch / max(weight_time, flop_time)
    bound = "weights" if weight_time >= flop_time else "matmuls"
    print(f"{batch:5d} {tokens_per_s:9.1f} {roofline:9.1f} {tokens_per_s / roofline:11.0%}  {bound}")
  met = all(decode[b] * max(ours.bytes_per_token / bandwidth,
                            matmul_flops_per_token * b / flop_rate) / b >= 0.8
            for b in decode if b <= 64)
  print(f"target >= 80% of the roofline up to batch 64: {'met' if met else 'missed'}")


if __name__ == "__main__":
  sys.exit(main())
