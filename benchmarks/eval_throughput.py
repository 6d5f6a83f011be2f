"""Evaluation throughput: `goosejax eval ppl`'s scoring against the Hugging Face-format peer
that users load goosejax's export into, on the same weights and documents, in one run.

    python benchmarks/eval_throughput.py             # 0.1B shape (L12 D768 V65536), fp32, CPU

The peers: pip install rwkv7-hf==0.9.0 flash-linear-attention==0.6.0 triton (FLA imports
triton at import time; nothing here runs a Triton kernel) into the environment with torch.

Random 0.1B-shaped fp32 weights are exported with `goosejax convert --to hf`'s writer
(goosejax.convert.hf_checkpoint.save_hf) and loaded by the two peers' RWKV7ForCausalLM:
rwkv7-hf 0.9.0 (pure PyTorch) and flash-linear-attention 0.6.0, whose Triton ops (which need
a GPU) are swapped for FLA's own PyTorch references: `fuse_norm=False` (torch LayerNorm,
GroupNorm, F.normalize), token_shift_ref, torch_addcmul_rwkv7, k_update_ref,
gate_output_correction_ref, the squared ReLU written out, and for chunk_rwkv7 its generalized
delta rule's chunked reference (fla.ops.generalized_delta_rule.dplr.naive.dplr_chunkwise).
All score the same documents (document-start token 0, then random ids), --batch-size
documents side by side, each from a fresh state:
  goosejax  goosejax.eval.perplexity(model, documents), what `goosejax eval ppl` runs
  peers     model(input_ids).logits per batch under torch.no_grad, log-softmax, the targets'
            log-probabilities summed (torch's threads: as many as the machine's cores)
Rounds alternate between the runtimes so all see the same machine load; the table gives each
one's best and median round in scored tokens per second, the ratios, the losses, and each
peer's largest logit difference from goosejax's on the first batch relative to the largest
logit (the same function on the same inputs: ~1e-6).
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

from inference import random_state_dict


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--vocab", type=int, default=65536)
  p.add_argument("--documents", type=int, default=4)
  p.add_argument("--document-tokens", type=int, default=256, help="tokens per document (with 0)")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--chunk-len", type=int, default=256, help="goosejax's tokens per step "
                 "(`goosejax eval ppl`'s default)")
  p.add_argument("--rounds", type=int, default=2)
  return p


class Goosejax:
  def __init__(self, state_dict, batch_size: int, chunk_len: int):
    from flax import nnx

    from goosejax.convert.official import official_to_params
    from goosejax.model import RWKV7
    from goosejax.model.params import load_param_dict

    self.cfg, self.params = official_to_params(state_dict)
    self.model = nnx.eval_shape(lambda: RWKV7(self.cfg, rngs=nnx.Rngs(0)))
    load_param_dict(self.model, self.params)
    self.batch_size, self.chunk_len = batch_size, chunk_len

  def score(self, documents: list[list[int]]) -> tuple[float, float]:
    """(seconds, mean loss per scored token) of `perplexity` on documents (0 not included)."""
    from goosejax.eval import perplexity

    start = time.perf_counter()
    result = perplexity(self.model, [d[1:] for d in documents], batch_size=self.batch_size,
                        chunk_len=self.chunk_len)
    return time.perf_counter() - start, result.loss

  def logits(self, ids_BT: np.ndarray) -> np.ndarray:
    return np.asarray(self.model(ids_BT)[0])


class Rwkv7Hf:
  def __init__(self, goosejax: Goosejax, batch_size: int):
    import torch
    from rwkv7_hf import RWKV7ForCausalLM

    from goosejax.convert.hf_checkpoint import save_hf

    self.torch = torch
    with tempfile.TemporaryDirectory() as tmp:
      save_hf(goosejax.params, goosejax.cfg, tmp)
      self.model = RWKV7ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    self.batch_size = batch_size

  def score(self, documents: list[list[int]]) -> tuple[float, float]:
    return _score_torch(self.torch, self.model, documents, self.batch_size)

  def logits(self, ids_BT: np.ndarray) -> np.ndarray:
    with self.torch.no_grad():
      return self.model(self.torch.tensor(ids_BT), use_cache=False).logits.numpy()


class FlaTorchReference(Rwkv7Hf):
  """FLA's RWKV7ForCausalLM with its Triton ops replaced by FLA's torch references."""

  def __init__(self, goosejax: Goosejax, batch_size: int, chunk_size: int = 32):
    import torch
    from fla.models.rwkv7 import RWKV7ForCausalLM, modeling_rwkv7

    from goosejax.convert.hf_checkpoint import save_hf

    _use_fla_torch_references(modeling_rwkv7, chunk_size)
    self.torch = torch
    with tempfile.TemporaryDirectory() as tmp:
      save_hf(goosejax.params, goosejax.cfg, tmp)
      self.model = RWKV7ForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                    fuse_norm=False).eval()
    for layer in self.model.model.layers:
      layer.ffn.act_fn = lambda x: torch.relu(x).square()
    self.batch_size = batch_size


def _use_fla_torch_references(modeling_rwkv7, chunk_size: int) -> None:
  """Point FLA's RWKV-7 layers at its torch references (fresh documents only: no cache)."""
  from fla.layers import rwkv7 as layer
  from fla.modules.token_shift import token_shift_ref
  from fla.ops.generalized_delta_rule.dplr.naive import dplr_chunkwise
  from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
  from fla.ops.rwkv7.fused_k_update import k_update_ref
  from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

  def token_shift(x, cu_seqlens=None, cache=None, output_cache=False, **unused):
    delta = token_shift_ref(x, cu_seqlens)
    return (delta, x[:, -1:]) if output_cache else delta

  def chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False,
                  **unused):
    heads_first = lambda x: x.transpose(1, 2)     # [B, T, H, D] -> [B, H, T, D]
    q = r * scale * r.shape[-1] ** 0.5              # the reference scales q by D ** -0.5
    o, state = dplr_chunkwise(*map(heads_first, (q, k, v, a, b, w)), initial_state,
                              output_final_state, chunk_size=chunk_size)
    return heads_first(o), state

  layer.token_shift = modeling_rwkv7.token_shift = token_shift
  layer.fused_addcmul_rwkv7 = torch_addcmul_rwkv7
  layer.fused_k_rwkv7 = k_update_ref
  layer.gate_output_correction = gate_output_correction_ref
  layer.chunk_rwkv7 = chunk_rwkv7


def _score_torch(torch, model, documents: list[list[int]], batch_size: int) -> tuple[float, float]:
  start = time.perf_counter()
  nll, count = 0.0, 0
  with torch.no_grad():
    for i in range(0, len(documents), batch_size):
      ids = torch.tensor(documents[i:i + batch_size])
      logp = torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), dim=-1)
      nll -= float(logp.gather(-1, ids[:, 1:, None]).sum())
      count += ids[:, 1:].numel()
  return time.perf_counter() - start, nll / count


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at start; model L{args.layers} D{args.width} V{args.vocab} "
        f"fp32; {args.documents} documents of {args.document_tokens} tokens, batch "
        f"{args.batch_size}", flush=True)
  rng = np.random.default_rng(0)
  documents = [[0] + rng.integers(1, args.vocab, args.document_tokens - 1).tolist()
               for _ in range(args.documents)]
  ours = Goosejax(random_state_dict(args.layers, args.width, args.vocab), args.batch_size,
                  args.chunk_len)
  peers = {"goosejax eval ppl": ours, "rwkv7-hf 0.9.0": Rwkv7Hf(ours, args.batch_size),
           "fla 0.6.0 (torch ref)": FlaTorchReference(ours, args.batch_size)}
  ours.score(documents[:args.batch_size])     # compiles the scoring step (torch has none)
  first_batch = np.array(documents[:args.batch_size])
  reference = ours.logits(first_batch)
  differences = {name: float(np.max(np.abs(runtime.logits(first_batch) - reference))
                             / np.max(np.abs(reference)))
                 for name, runtime in peers.items() if runtime is not ours}
  tokens = sum(len(d) - 1 for d in documents)
  seconds: dict[str, list[float]] = {name: [] for name in peers}
  losses: dict[str, float] = {}
  for _ in range(args.rounds):
    for name, runtime in peers.items():
      elapsed, losses[name] = runtime.score(documents)
      seconds[name].append(elapsed)
  print(f"\n{'':22s} {'best tok/s':>11s} {'median tok/s':>13s} {'loss':>10s} "
        f"{'logits vs goosejax':>19s}")
  for name, values in seconds.items():
    difference = f"{differences[name]:.1e}" if name in differences else "-"
    print(f"{name:22s} {tokens / min(values):11.1f} {tokens / statistics.median(values):13.1f} "
          f"{losses[name]:10.6f} {difference:>19s}")
  ours_s = seconds.pop("goosejax eval ppl")
  for name, theirs_s in seconds.items():
    best = min(theirs_s) / min(ours_s)
    median = statistics.median(theirs_s) / statistics.median(ours_s)
    print(f"ratio goosejax / {name}: {best:.2f}x (best rounds), {median:.2f}x (medians); "
          f"target >= 2x: {'met' if min(best, median) >= 2 else 'missed'}")
  print(f"load average {os.getloadavg()[0]:.2f} at the end")
  return 0


if __name__ == "__main__":
  sys.exit(main())
