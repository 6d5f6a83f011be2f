"""Training-loader throughput: tokens/s that `make_train_iterator` delivers from a binidx file.

  python benchmarks/data.py [--ctx-len 4096] [--batch 8] [--batches 100] [--tokens 16e6]

Writes a temporary binidx dataset of random World ids in documents of 50..5000 tokens,
then times `--batches` batches (after 5 warm-up batches) for each order with and without
document packing. One process, Grain's default read threads; the numbers are per host.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from goosejax.config import DataConfig
from goosejax.data import BinIdxWriter, make_train_iterator


def write_dataset(prefix: Path, n_tokens: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  written = 0
  with BinIdxWriter(prefix, np.uint16) as writer:
    while written < n_tokens:
      doc = rng.integers(1, 65530, size=int(rng.integers(50, 5000)), dtype=np.uint16)
      doc[-1] = 0
      writer.add_document(doc)
      written += len(doc)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ctx-len", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--tokens", type=float, default=16e6)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    prefix = Path(tmp) / "bench"
    write_dataset(prefix, int(args.tokens))
    print(f"\nloader tokens/s, ctx_len {args.ctx_len}, batch {args.batch}, {args.batches} batches; "
          f"{platform.machine()}, Python {platform.python_version()}")
    print("| order | pack_documents | tokens/s | ms/batch |")
    print("|---|---|---|---|")
    for order in ("shuffle", "magic_prime"):
      for pack in (False, True):
        config = DataConfig(source="binidx", paths=(str(prefix),), ctx_len=args.ctx_len,
                            batch_size=args.batch, order=order, pack_documents=pack,
                            validation_fraction=0.0)
        iterator = make_train_iterator(config, 0, 1, vocab_size=65536)
        for _ in range(5):
          next(iterator)
        start = time.perf_counter()
        for _ in range(args.batches):
          next(iterator)
        seconds = time.perf_counter() - start
        tokens = args.batches * args.batch * args.ctx_len
        print(f"| {order} | {pack} | {tokens / seconds:,.0f} | {1e3 * seconds / args.batches:.2f} |")


if __name__ == "__main__":
  main()
