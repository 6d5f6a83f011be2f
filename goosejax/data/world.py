"""The RWKV "World" tokenizer (`rwkv_vocab_v20230424`): greedy longest match over UTF-8 bytes.

Encoding emits, from the current byte offset, the id of the longest vocabulary token that
matches there, then advances past it; every single byte is a token, so it always succeeds.
Id 0 is end-of-text (not in the vocabulary file); no normalization, no special tokens.

Two encoders give identical ids (tests check both against the official `TRIE_TOKENIZER`):
- `encode_reference`: a pure-Python byte trie, the readable reference.
- the fast path behind `encode`: a leftmost-longest Aho-Corasick automaton from the
  `ahocorasick_rs` wheel (Rust). Leftmost-longest non-overlapping matching *is* greedy
  longest match here because every single byte is a pattern, so the leftmost match always
  starts at the current offset. Bytes are mapped 1:1 onto Latin-1 characters so that the
  automaton sees exactly one character per byte.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Iterable, Sequence

from goosejax.errors import DataError

VOCAB_PATH = Path(__file__).resolve().parent / "rwkv_vocab_v20230424.txt"
VOCAB_SHA256 = "e6dee3d4e31b4d5c40ac99508ac6c701ceef4bed681bf2167ce9a908552bca89"
EOT_ID = 0
_ID_KEY = 256  # trie nodes are dicts keyed by byte value 0..255; this key holds the token id


def parse_vocab(path: str | Path) -> list[bytes]:
  """Token bytes by id from an `rwkv_vocab`-format file (index 0 is b"" for end-of-text).

  Each line is `<id> <python str or bytes literal> <byte length>`; CRLF and LF both work.
  """
  path = Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read the vocabulary file: {e}") from None
  tokens: list[bytes] = [b""]
  seen: dict[bytes, int] = {}
  for line_no, line in enumerate(lines, 1):
    line = line.rstrip()
    if not line:
      continue
    first, last = line.find(" "), line.rfind(" ")
    where = f"{path}:{line_no}"
    try:
      token_id, length = int(line[:first]), int(line[last + 1:])
      literal = ast.literal_eval(line[first:last].strip())
    except (ValueError, SyntaxError):
      raise DataError(f"{where}: expected `<id> <python literal> <byte length>`, got {line!r}") from None
    token = literal.encode("utf-8") if isinstance(literal, str) else literal
    if not isinstance(token, bytes) or len(token) != length or not token:
      raise DataError(f"{where}: token {literal!r} is not a non-empty str/bytes of {length} bytes")
    if token_id != len(tokens):
      raise DataError(f"{where}: id {token_id} out of order; ids must be 1, 2, 3, ... without gaps")
    if token in seen:
      raise DataError(f"{where}: token {token!r} repeats id {seen[token]}")
    seen[token] = token_id
    tokens.append(token)
  missing = [b for b in range(256) if bytes([b]) not in seen]
  if missing:
    raise DataError(f"{path}: single-byte tokens {missing[:8]} are missing; greedy encoding "
                    "needs all 256 bytes in the vocabulary")
  return tokens


class WorldTokenizer:
  """`encode(str) -> list[int]`, `encode_batch`, `decode(ids) -> str`, `vocab_size`, `eot_id`.

  `vocab_size` counts the ids the tokenizer can produce (65530 for World: 0..65529); released
  models have 65536 embedding rows. `decode` replaces invalid UTF-8 with U+FFFD per bad
  sequence (the official tokenizer returns a single U+FFFD for the whole string instead).
  """

  eot_id: int = EOT_ID

  def __init__(self, vocab_path: str | Path = VOCAB_PATH):
    self.vocab_path = Path(vocab_path)
    self.id_to_bytes: list[bytes] = parse_vocab(self.vocab_path)
    self.vocab_size = len(self.id_to_bytes)
    self._automaton, self._latin1_to_id = _build_automaton(self.id_to_bytes)
    self.backend = "python" if self._automaton is None else "ahocorasick_rs"
    if self._automaton is not None:  # bound once: encode is called per document
      self._find = self._automaton.find_matches_as_strings
      self._piece_id = self._latin1_to_id.__getitem__

  def __reduce__(self):
    return (WorldTokenizer, (self.vocab_path,))

  def __repr__(self) -> str:
    return f"WorldTokenizer({str(self.vocab_path)!r}, vocab_size={self.vocab_size}, backend={self.backend!r})"

  def encode(self, text: str) -> list[int]:
    if self._automaton is None:
      return self.encode_reference(_utf8(text))
    try:  # ASCII text is its own Latin-1 view of its UTF-8 bytes: skip two copies
      latin1 = text if text.isascii() else text.encode("utf-8").decode("latin-1")
      return list(map(self._piece_id, self._find(latin1)))
    except (AttributeError, TypeError, UnicodeEncodeError):
      _utf8(text)  # raises the descriptive error for non-str or unencodable text
      raise

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(text) for text in texts]

  def encode_reference(self, data: bytes | str) -> list[int]:
    """Greedy longest match with a pure-Python byte trie (the reference for the fast path)."""
    if isinstance(data, str):
      data = _utf8(data)
    root, ids, pos, n = self._trie, [], 0, len(data)
    while pos < n:
      node, i, best_id, best_end = root, pos, -1, pos
      while i < n:
        node = node.get(data[i])
        if node is None:
          break
        i += 1
        token_id = node.get(_ID_KEY)
        if token_id is not None:
          best_id, best_end = token_id, i
      ids.append(best_id)
      pos = best_end
    return ids

  def decode_bytes(self, ids: Sequence[int]) -> bytes:
    table = self.id_to_bytes
    try:
      return b"".join([table[i] for i in ids])
    except (IndexError, TypeError):
      bad = next(i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size)
      raise DataError(f"token id {bad!r} is outside the World vocabulary [0, {self.vocab_size})") from None

  def decode(self, ids: Sequence[int]) -> str:
    return self.decode_bytes([int(i) for i in ids]).decode("utf-8", errors="replace")

  @functools.cached_property
  def _trie(self) -> dict:
    root: dict = {}
    for token_id, token in enumerate(self.id_to_bytes[1:], 1):
      node = root
      for byte in token:
        node = node.setdefault(byte, {})
      node[_ID_KEY] = token_id
    return root


def _utf8(text: str) -> bytes:
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise DataError(f"text is not encodable as UTF-8 at character {e.start} "
                    f"({text[e.start:e.end]!r}, a lone surrogate?)") from None
  except AttributeError:
    raise DataError(f"expected str to encode, got {type(text).__name__}") from None


def _build_automaton(id_to_bytes: list[bytes]):
  """(automaton, latin-1 piece -> id) or (None, {}) when `ahocorasick_rs` is not installed."""
  try:
    import ahocorasick_rs
  except ImportError:
    return None, {}
  pieces = [token.decode("latin-1") for token in id_to_bytes[1:]]
  automaton = ahocorasick_rs.AhoCorasick(
      pieces, matchkind=ahocorasick_rs.MatchKind.LeftmostLongest, store_patterns=True,
      implementation=ahocorasick_rs.Implementation.ContiguousNFA)
  return automaton, {piece: token_id for token_id, piece in enumerate(pieces, 1)}
