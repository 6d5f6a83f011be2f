"""Perplexity, bits per byte and LAMBADA agree with the official runtime; data files; the CLI.

Fixtures: tests/fixtures/make_generate_fixtures.py, then make_eval_fixtures.py (torch + rwkv).
"""
import io
import json
import math
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import goosejax
from goosejax import cli
from goosejax.convert.hf_checkpoint import save_hf
from goosejax.convert.official import official_to_params
from goosejax.data.binidx import BinIdxWriter
from goosejax.eval import (EvalDataError, evaluate_lambada, load_documents, perplexity,
                           read_lambada, score_sequences)
from goosejax.model import RWKV7
from goosejax.model.params import load_param_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_generate_fixtures import CHECKPOINT, random_checkpoint, weights_digest  # noqa: E402

OFFICIAL = json.loads((FIXTURES / "generate_official" / "eval.json").read_text())
TOKENIZER_PATH = FIXTURES / "generate_official" / "tokenizer.json"
BATCH, CHUNK = 3, 16    # small chunks: sequences cross chunk borders and share rows


@pytest.fixture(scope="module")
def checkpoint():
  state_dict = random_checkpoint(**CHECKPOINT)
  assert weights_digest(state_dict) == OFFICIAL["weights_sha256"]
  return official_to_params(state_dict)


@pytest.fixture(scope="module")
def model(checkpoint):
  cfg, params = checkpoint
  model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
  load_param_dict(model, params)
  return model


@pytest.fixture(scope="module")
def tokenizer():
  return goosejax.load_tokenizer(TOKENIZER_PATH)


def test_lambada_matches_the_official_protocol(model, tokenizer):
  case = OFFICIAL["lambada"]
  result = evaluate_lambada(model, tokenizer, case["texts"], batch_size=BATCH, chunk_len=CHUNK)
  assert result.documents == len(case["texts"])
  assert result.correct == sum(case["correct"]) >= 3
  assert result.logprob_sum == pytest.approx(sum(case["logprob"]), rel=1e-5)
  assert result.perplexity == pytest.approx(case["perplexity"], rel=1e-4)
  assert result.accuracy == pytest.approx(case["accuracy"])


def test_perplexity_and_bits_per_byte_match_the_official_runtime(model, tokenizer):
  case = OFFICIAL["documents"]
  docs = [tokenizer.encode(t) for t in case["texts"]]
  assert docs == case["token_ids"]
  n_bytes = [len(t.encode()) for t in case["texts"]]
  result = perplexity(model, docs, n_bytes, batch_size=BATCH, chunk_len=CHUNK)
  nll = -sum(case["logprob"])
  assert result.nll == pytest.approx(nll, rel=1e-5)
  assert result.tokens == sum(map(len, docs)) and result.bytes == sum(n_bytes)
  assert result.perplexity == pytest.approx(math.exp(nll / result.tokens), rel=1e-5)
  assert result.bits_per_byte == pytest.approx(nll / math.log(2) / sum(n_bytes), rel=1e-5)


def test_scores_do_not_depend_on_packing_or_chunking(model):
  rng = np.random.default_rng(0)
  sequences = [[0] + rng.integers(0, 320, n).tolist() for n in (1, 40, 7, 23, 2)]
  packed = score_sequences(model, sequences, batch_size=BATCH, chunk_len=CHUNK)
  alone = [score_sequences(model, [s], batch_size=BATCH, chunk_len=CHUNK)[0] for s in sequences[:2]]
  for a, b in zip(alone, packed[:2]):
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-4)
    assert np.array_equal(a.greedy, b.greedy)
  assert [len(s.logprobs) for s in packed] == [len(s) - 1 for s in sequences]


def test_documents_from_txt_jsonl_and_binidx(tokenizer, tmp_path):
  texts = ["The quick brown fox 12", "Goose models: 0.1B, 0.4B", "tabs\tand  spaces"]
  (tmp_path / "one.txt").write_text(texts[0])
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
  with BinIdxWriter(tmp_path / "docs") as writer:
    for t in texts:
      writer.add_document(tokenizer.encode(t) + [0])
  encoded = [tokenizer.encode(t) for t in texts]
  n_bytes = [len(t.encode()) for t in texts]
  assert load_documents(tmp_path / "one.txt", tokenizer) == (encoded[:1], n_bytes[:1])
  assert load_documents(tmp_path / "docs.jsonl", tokenizer, text_field="body") == (encoded, n_bytes)
  for path in ("docs", "docs.bin", "docs.idx"):
    assert load_documents(tmp_path / path, tokenizer) == (encoded, n_bytes)
  assert load_documents(tmp_path / "docs.jsonl", tokenizer, text_field="body", max_documents=2)[0] == encoded[:2]
  with pytest.raises(EvalDataError, match="missing.jsonl"):
    load_documents(tmp_path / "missing.jsonl", tokenizer)
  (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
  with pytest.raises(EvalDataError, match="bad.jsonl"):
    read_lambada(tmp_path / "bad.jsonl")
  with BinIdxWriter(tmp_path / "wide") as writer:      # ids from a larger vocabulary
    writer.add_document([5, 6, 7])
    writer.add_document([5, 400, 7])
  assert load_documents(tmp_path / "wide", tokenizer, max_documents=1)[0] == [[5, 6, 7]]
  with pytest.raises(EvalDataError, match=r"wide: item 1 has token ids outside \[0, 320\) .*\[400\]"):
    load_documents(tmp_path / "wide", tokenizer)
  with pytest.raises(EvalDataError, match=r"docs.jsonl: document 1 .* \[0, 300\) \(the model's.*\[301\]"):
    load_documents(tmp_path / "docs.jsonl", tokenizer, text_field="body", vocab_size=300)


@pytest.mark.parametrize("text, problem", [("   ", "whitespace only"), ("", "whitespace only"),
                                            ("a dog and a ", "ends in whitespace"),
                                            ("oneword", "no space")])
def test_lambada_texts_without_a_last_word_are_refused_with_file_and_line(tmp_path, text, problem):
  path = tmp_path / "lambada.jsonl"
  path.write_text(json.dumps({"text": "the cat sat"}) + "\n\n" + json.dumps({"text": text}) + "\n")
  with pytest.raises(EvalDataError, match=rf"lambada.jsonl:3: .*{problem}"):
    read_lambada(path)


def test_eval_cli_on_an_hf_directory(checkpoint, tmp_path):
  cfg, params = checkpoint
  save_hf(params, cfg, tmp_path / "hf")
  lambada = tmp_path / "lambada.jsonl"
  lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in OFFICIAL["lambada"]["texts"]))
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in OFFICIAL["documents"]["texts"]))
  common = ["--model", str(tmp_path / "hf"), "--tokenizer", str(TOKENIZER_PATH), "--json",
            "--quiet", "--batch-size", str(BATCH), "--chunk-len", str(CHUNK)]
  outputs = []
  for task, data in (("lambada", lambada), ("ppl", docs)):
    out = io.StringIO()
    with redirect_stdout(out):
      assert cli.main(["eval", task, "--data", str(data)] + common) == 0
    outputs.append(json.loads(out.getvalue()))
  assert outputs[0]["accuracy"] == pytest.approx(OFFICIAL["lambada"]["accuracy"])
  assert outputs[0]["perplexity"] == pytest.approx(OFFICIAL["lambada"]["perplexity"], rel=1e-4)
  n_tokens = sum(map(len, OFFICIAL["documents"]["token_ids"]))
  assert outputs[1]["tokens"] == n_tokens
  assert outputs[1]["loss"] == pytest.approx(-sum(OFFICIAL["documents"]["logprob"]) / n_tokens, rel=1e-5)

  def fails(args, *names):
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
      assert cli.main(["eval"] + args + common) == 2
    assert err.getvalue().count("\n") == 1 and all(name in err.getvalue() for name in names), err.getvalue()

  fails(["ppl", "--data", str(tmp_path / "nope.jsonl")], "nope.jsonl")
  with BinIdxWriter(tmp_path / "wide") as writer:
    writer.add_document([5, 400, 7])
  fails(["ppl", "--data", str(tmp_path / "wide.bin")], "wide", "[400]")
  lambada.write_text(lambada.read_text() + json.dumps({"text": " \t "}) + "\n")
  fails(["lambada", "--data", str(lambada)], f"lambada.jsonl:{len(OFFICIAL['lambada']['texts']) + 1}:",
        "whitespace only")
