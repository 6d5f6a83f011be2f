"""SentencePiece (train, load, use in prepare-data and pipelines) and Hugging Face tokenizer.json."""
import json
import pickle

import numpy as np
import pytest

from goosejax import cli
from goosejax.config import DataConfig
from goosejax.data import DataError, load_tokenizer, make_train_iterator, train_sentencepiece
from goosejax.data.binidx import BinIdxDataset

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n" * 3,
    "def tokenize(text):\n    return [ord(c) for c in text]\n\n\nprint(tokenize('abc'))\n",
    "RWKV-7 Goose trains like a transformer and runs like an RNN. " * 4,
    "Zahlen: 1234567890, 3.14159, 2.71828; Satzzeichen: !?;:()[]{}\n",
]
ROUND_TRIP = ["  leading spaces\tand tabs\n\nnewlines  ", "unseen: 中文 ☃ 🦢 émigré", "12345 67890", ""]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("spm") / "tok.model", vocab_size=400)


def test_trained_sentencepiece_round_trips_with_eot_zero(spm_path):
  tok = load_tokenizer(spm_path)
  assert tok.eot_id == 0 and tok.vocab_size == 400
  for text in ROUND_TRIP:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 0 not in ids and 1 not in ids  # byte fallback: no <unk>; eot never inside text
  assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]
  assert len(tok.encode(CORPUS[2])) < len(CORPUS[2]) / 2  # merges were learned
  assert pickle.loads(pickle.dumps(tok)).encode(CORPUS[0]) == tok.encode(CORPUS[0])
  with pytest.raises(DataError, match="outside the vocabulary"):
    tok.decode([400])


def test_sentencepiece_in_prepare_data_and_pipeline(tmp_path, capsys):
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS * 3))
  code = cli.main(["prepare-data", str(tmp_path / "docs.jsonl"), "--train-spm", str(tmp_path / "m.model"),
                   "--vocab-size", "380", "--out", str(tmp_path / "ds"), "--quiet"])
  assert code == 0 and "trained SentencePiece bpe model" in capsys.readouterr().out
  tok = load_tokenizer(tmp_path / "m.model")
  dataset = BinIdxDataset(tmp_path / "ds")
  assert [dataset[i].tolist() for i in range(len(dataset))] == [tok.encode(t) + [0] for t in CORPUS * 3]
  cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "docs.jsonl"),), tokenizer=str(tmp_path / "m.model"),
                   ctx_len=32, batch_size=2, pack_documents=True, validation_fraction=0)
  batch = next(make_train_iterator(cfg, 0, 1, vocab_size=tok.vocab_size))
  assert batch["inputs"].max() < 380 and np.array_equal(batch["reset"], batch["inputs"] == 0)


def test_sentencepiece_errors(tmp_path):
  import sentencepiece
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "noeos"), vocab_size=70,
      eos_id=-1, bos_id=-1, minloglevel=2)
  with pytest.raises(DataError, match="noeos.model: the SentencePiece model has no end-of-sentence"):
    load_tokenizer(tmp_path / "noeos.model")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(DataError, match="junk.model: not a readable SentencePiece model"):
    load_tokenizer(tmp_path / "junk.model")
  with pytest.raises(DataError, match="no text"):
    train_sentencepiece([], tmp_path / "empty.model", vocab_size=300)
  with pytest.raises(DataError, match="use at least 262"):
    train_sentencepiece(CORPUS, tmp_path / "small.model", vocab_size=100)


def make_hf_tokenizer(path, special=("<|endoftext|>",)):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(CORPUS, trainer)
  tokenizer.save(str(path))
  return path


def test_hf_tokenizer_json(tmp_path):
  tok = load_tokenizer(make_hf_tokenizer(tmp_path / "tokenizer.json"))
  assert tok.eot_id == 0 and 256 < tok.vocab_size <= 400
  for text in ROUND_TRIP:
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]
  lone_byte = tok.encode("中")[:1]  # the first of the three UTF-8 bytes of 中
  assert tok.decode(lone_byte) == "\ufffd"
  with pytest.raises(DataError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])


def test_hf_tokenizer_errors(tmp_path):
  with pytest.raises(DataError, match=r"none of \['<\|endoftext\|>'"):
    load_tokenizer(make_hf_tokenizer(tmp_path / "plain.json", special=()))
  (tmp_path / "broken.json").write_text("{\"model\": 3}")
  with pytest.raises(DataError, match="broken.json: not a valid Hugging Face tokenizer.json"):
    load_tokenizer(tmp_path / "broken.json")
