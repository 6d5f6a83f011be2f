"""Citations point at documents the repository holds: no section citations of an outside
"spec", and every link to an anchor of docs/architecture.md names a heading that file has."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SCANNED_DIRS = ("goosejax", "pallas_kernels", "tests", "benchmarks", "experiments", "configs",
                "launch", "docs")
SCANNED_FILES = ("README.md",)
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg"}
SKIPPED = {"rwkv_vocab_v20230424.txt"}  # token data, not prose

# Written with escapes so this file does not match itself.
SPEC_CITATION = re.compile(r"\bspec\b[^\n\u00a7]{0,24}\u00a7", re.IGNORECASE)  # also with a file name
ANCHOR_LINK = re.compile(r"docs/architecture\.md#([\w-]+)")
LOCAL_ANCHOR_LINK = re.compile(r"\]\(#([^)\s]+)\)")

# The sections other modules cite.
SECTIONS = ("parameters-and-checkpoint-layout", "the-forward-pass", "the-chunked-wkv-7-form",
            "initialisation-and-optimizer", "tokenizer", "training-data-binidx-and-sample-order",
            "evaluation-protocol", "data-flow-from-config-to-kernel")


def github_anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to '-'."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
  """Every heading's anchor (outside fenced code), with GitHub's -1, -2 ... for repeats."""
  found, seen, fenced = set(), {}, False
  for line in markdown.splitlines():
    if line.lstrip().startswith("```"):
      fenced = not fenced
      continue
    match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if match and not fenced:
      anchor = github_anchor(match[1])
      count = seen.get(anchor, 0)
      seen[anchor] = count + 1
      found.add(anchor if count == 0 else f"{anchor}-{count}")
  return found


def scanned_files():
  paths = [ROOT / name for name in SCANNED_FILES]
  for directory in SCANNED_DIRS:
    paths += sorted(p for p in (ROOT / directory).rglob("*")
                    if p.is_file() and p.suffix in SUFFIXES and p.name not in SKIPPED
                    and "__pycache__" not in p.parts)
  return paths


def test_github_anchor_rule():
  assert github_anchor("Training data: binidx and sample order") == "training-data-binidx-and-sample-order"
  assert github_anchor("The chunked WKV-7 form") == "the-chunked-wkv-7-form"
  assert github_anchor("Hugging Face / flash-linear-attention names") == "hugging-face--flash-linear-attention-names"
  assert github_anchor("Official `.pth` keys") == "official-pth-keys"
  assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def test_architecture_has_the_cited_sections():
  assert set(SECTIONS) <= anchors(ARCHITECTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def texts():
  return {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8", errors="replace")
          for path in scanned_files()}


def test_nothing_cites_an_outside_spec(texts):
  found = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
           for name, text in texts.items() for m in SPEC_CITATION.finditer(text)]
  assert found == [], "cite docs/architecture.md#<section> or an RWKV-LM path instead"


def test_architecture_links_name_existing_headings(texts):
  known = anchors(ARCHITECTURE.read_text(encoding="utf-8"))
  links = [(name, m.group(1)) for name, text in texts.items() for m in ANCHOR_LINK.finditer(text)]
  links += [("docs/architecture.md", m.group(1))
            for m in LOCAL_ANCHOR_LINK.finditer(texts["docs/architecture.md"])]
  assert links, "no links found: the scan is broken"
  assert [(name, anchor) for name, anchor in links if anchor not in known] == []
