"""World tokenizer encode throughput: goosejax (Aho-Corasick fast path and the pure-Python
reference) against the official `rwkv` TRIE_TOKENIZER and the `pyrwkv-tokenizer` wheel.

  python benchmarks/tokenizer.py [--repeats 3] [--mb 1.0]

Corpora are built from text every Python install has: `english` = the Python docs'
topic texts (pydoc_data), `code` = standard-library sources, `multilingual` = the tokenizer
test fixtures joined into ~4 KB documents (CJK, Arabic, Devanagari, emoji, control
characters, long space runs). Each corpus is a list of documents, one `encode` call each;
MB/s counts UTF-8 bytes, best of `--repeats` rounds that time every contender in turn.
Peers that are not installed are skipped; every contender's ids are checked against
goosejax's before its time is reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import sysconfig
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def corpora(megabytes: float) -> dict[str, list[str]]:
  import pydoc_data.topics

  limit = int(megabytes * 1e6)

  def cap(documents: list[str]) -> list[str]:
    out, total = [], 0
    while total < limit:
      for doc in documents:
        out.append(doc)
        total += len(doc.encode())
        if total >= limit:
          break
    return out

  stdlib = Path(sysconfig.get_paths()["stdlib"])
  code = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
  cases = json.loads((REPO / "tests" / "fixtures" / "world_tokenizer_ids.json").read_text())["cases"]
  snippets = [c["text"] for c in cases if c["text"]]
  multilingual = ["".join(snippets[i:i + 40]) for i in range(0, len(snippets), 40)]  # ~4 KB documents
  return {"english": cap(list(pydoc_data.topics.topics.values())), "code": cap(code),
          "multilingual": cap(multilingual)}


def contenders() -> dict[str, Callable[[str], list[int]]]:
  from goosejax.data import load_tokenizer

  world = load_tokenizer("world")
  found = {"goosejax (ahocorasick_rs)": world.encode, "goosejax reference (Python trie)":
           lambda text: world.encode_reference(text.encode("utf-8"))}
  try:
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    import rwkv
    official = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    found["official rwkv TRIE_TOKENIZER"] = official.encode
  except ImportError:
    print("(rwkv not installed: official tokenizer skipped)")
  try:
    import pyrwkv_tokenizer
    found["pyrwkv-tokenizer (Rust)"] = pyrwkv_tokenizer.RWKVTokenizer().encode
  except ImportError:
    print("(pyrwkv-tokenizer not installed: skipped)")
  return found


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--mb", type=float, default=1.0, help="corpus size in MB of UTF-8 each")
  args = parser.parse_args()
  texts = corpora(args.mb)
  encoders = contenders()
  reference = {name: [encoders["goosejax (ahocorasick_rs)"](d) for d in docs] for name, docs in texts.items()}
  rates: dict[str, dict[str, float]] = {}
  for corpus_name, docs in texts.items():
    n_bytes = sum(len(d.encode()) for d in docs)
    for encoder_name, encode in encoders.items():
      if [encode(d) for d in docs] != reference[corpus_name]:
        raise SystemExit(f"{encoder_name} disagrees with goosejax on {corpus_name}")
    best = dict.fromkeys(encoders, float("inf"))
    for _ in range(args.repeats):  # round-robin, so load changes on a shared machine hit all alike
      for encoder_name, encode in encoders.items():
        start = time.perf_counter()
        for doc in docs:
          encode(doc)
        best[encoder_name] = min(best[encoder_name], time.perf_counter() - start)
    for encoder_name, seconds in best.items():
      rates.setdefault(encoder_name, {})[corpus_name] = n_bytes / seconds / 1e6
  official = rates.get("official rwkv TRIE_TOKENIZER")
  print(f"\nWorld tokenizer encode, MB/s of UTF-8 (best of {args.repeats}); "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
  header = "| tokenizer | " + " | ".join(texts) + (" | vs official |" if official else " |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  for name, row in rates.items():
    speedup = ""
    if official:
      speedup = " | " + " / ".join(f"{row[c] / official[c]:.1f}x" for c in texts)
    print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in texts) + speedup + " |")
  tokens = {c: sum(map(len, reference[c])) for c in texts}
  print("tokens: " + ", ".join(f"{c} {tokens[c]:,} ({sum(len(d.encode()) for d in texts[c]) / tokens[c]:.2f} B/token)"
                               for c in texts))


if __name__ == "__main__":
  main()
