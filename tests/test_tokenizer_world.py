"""World tokenizer: ids identical to the official TRIE_TOKENIZER (fixtures), fast path == reference."""
import hashlib
import json
import pickle
import random
from pathlib import Path

import pytest

import goosejax
from goosejax.data import DataError, load_tokenizer
from goosejax.data.world import VOCAB_PATH, VOCAB_SHA256, WorldTokenizer, parse_vocab

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "world_tokenizer_ids.json"
CASES = json.loads(FIXTURE.read_text())["cases"]
SPEC_VECTORS = {  # docs/architecture.md#tokenizer, verified with the official tokenizer
    "The Eiffel tower is in the city of": [6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706],
    "Hello world\n\n": [33155, 40213, 261],
    "User: hi\n\nAssistant:": [24281, 59, 4571, 261, 5585, 41693, 59],
    "中文测试": [10285, 13012, 13827, 16707],
    "\x00\x01": [1, 2],
}


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
  return load_tokenizer("world")


def test_packaged_vocab_is_the_lf_copy_with_its_notice():
  assert hashlib.sha256(VOCAB_PATH.read_bytes()).hexdigest() == VOCAB_SHA256
  notice = VOCAB_PATH.with_name("rwkv_vocab_v20230424.NOTICE.txt").read_text()
  assert "Apache License, Version 2.0" in notice and VOCAB_SHA256 in notice


def test_vocab_layout(world):
  assert world.vocab_size == 65530 and world.eot_id == 0
  assert world.id_to_bytes[0] == b""
  assert all(world.id_to_bytes[b + 1] == bytes([b]) for b in range(256))
  assert world.id_to_bytes[261] == b"\n\n" and world.id_to_bytes[65529] == b" " * 128


def test_fast_backend_is_active(world):
  assert world.backend == "ahocorasick_rs"


@pytest.mark.parametrize("text, ids", SPEC_VECTORS.items())
def test_spec_vectors(world, text, ids):
  assert world.encode(text) == ids
  assert world.encode_reference(text) == ids


def test_fast_path_matches_official_fixtures(world):
  assert len(CASES) > 300
  mismatches = [c["text"] for c in CASES if world.encode(c["text"]) != c["ids"]]
  assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def test_reference_matches_official_fixtures(world):
  mismatches = [c["text"] for c in CASES if world.encode_reference(c["text"]) != c["ids"]]
  assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def test_fast_path_matches_reference_on_random_text(world):
  rng = random.Random(0)
  alphabet = ([chr(c) for c in range(256)] + list(" \n\t\r") * 20 + list("etaoin shrdlu") * 10
              + list("中文测试éß😀\u200b"))
  for _ in range(100):
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
    assert world.encode(text) == world.encode_reference(text), text


def test_encode_batch_and_decode_round_trip(world):
  texts = [c["text"] for c in CASES[:80]]
  assert world.encode_batch(texts) == [c["ids"] for c in CASES[:80]]
  assert all(world.decode(c["ids"]) == c["text"] for c in CASES)


def test_decode_replaces_invalid_utf8(world):
  # b"\xe4" alone is a truncated 3-byte sequence; ids are byte + 1 for single bytes
  assert world.decode([0xE4 + 1, ord("A") + 1]) == "\ufffdA"
  assert world.decode([0]) == ""


def test_bad_inputs_raise_clear_errors(world):
  with pytest.raises(DataError, match="outside the World vocabulary"):
    world.decode([65530])
  with pytest.raises(DataError, match="lone surrogate"):
    world.encode("ok \ud800")
  with pytest.raises(DataError, match="expected str"):
    world.encode(b"bytes")


def test_loader_caches_exposes_and_pickles(world):
  assert load_tokenizer("world") is world
  assert goosejax.load_tokenizer("world") is world
  clone = pickle.loads(pickle.dumps(world))
  assert clone.encode("Hello world\n\n") == SPEC_VECTORS["Hello world\n\n"]


def test_crlf_vocab_file_parses_the_same(tmp_path):
  crlf = tmp_path / "rwkv_vocab_crlf.txt"
  crlf.write_bytes(VOCAB_PATH.read_bytes().replace(b"\n", b"\r\n"))
  assert load_tokenizer(crlf).id_to_bytes == load_tokenizer("world").id_to_bytes


def test_malformed_vocab_names_file_and_line(tmp_path):
  bad = tmp_path / "vocab.txt"
  bad.write_text("1 'a' 1\n3 'b' 1\n")
  with pytest.raises(DataError, match=r"vocab\.txt:2: id 3 out of order"):
    parse_vocab(bad)
  bad.write_text("1 'ab' 3\n")
  with pytest.raises(DataError, match=r"vocab\.txt:1: token 'ab' is not"):
    parse_vocab(bad)
  with pytest.raises(DataError, match="does not exist"):
    load_tokenizer(tmp_path / "missing.model")
  with pytest.raises(DataError, match="expected 'world'"):
    load_tokenizer("gpt2")
