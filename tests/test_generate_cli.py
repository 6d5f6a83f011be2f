"""`goosejax generate`: streamed text equals generate(); prompt-state caching; stop strings; errors."""
import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import goosejax
from goosejax import cli
from goosejax.convert.hf import save_hf
from goosejax.convert.official import official_to_params
from goosejax.infer import generate
from goosejax.infer.state_io import load_state
from goosejax.model import RWKV7
from goosejax.model.params import load_param_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_generate_fixtures import CHECKPOINT, random_checkpoint  # noqa: E402

TOKENIZER = str(FIXTURES / "generate_official" / "tokenizer.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  cfg, params = official_to_params(random_checkpoint(**CHECKPOINT))
  path = tmp_path_factory.mktemp("cli") / "hf"
  save_hf(params, cfg, path)
  model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
  load_param_dict(model, params)
  return model, goosejax.load_tokenizer(TOKENIZER), str(path)


def _run(args):
  out, err = io.StringIO(), io.StringIO()
  with redirect_stdout(out), redirect_stderr(err):
    rc = cli.main(["generate"] + args)
  return rc, out.getvalue(), err.getvalue()


GREEDY = ["--temperature", "0", "--presence-penalty", "0", "--frequency-penalty", "0",
          "--max-new-tokens", "16", "--block-size", "5"]


def test_streamed_text_and_state_caching(setup, tmp_path):
  model, tokenizer, path = setup
  state_file = tmp_path / "prompt.state"
  rc, out, _ = _run(["--model", path, "--tokenizer", TOKENIZER, "--prompt", "The Goose",
                     "--state-out", str(state_file)] + GREEDY)
  assert rc == 0
  prompt = tokenizer.encode("The Goose")
  expected = generate(model, prompt, 16, temperature=0, stop_ids=[tokenizer.eot_id])
  assert out == tokenizer.decode(expected) + "\n"
  # The saved state is the state after the prompt: continuing from it equals the whole text.
  cached = load_state(state_file, model)
  rc, out, _ = _run(["--model", path, "--tokenizer", TOKENIZER, "--prompt", " models",
                     "--state-in", str(state_file)] + GREEDY)
  continued = generate(model, tokenizer.encode(" models"), 16, temperature=0,
                       stop_ids=[tokenizer.eot_id], state=cached)
  whole = generate(model, prompt + tokenizer.encode(" models"), 16, temperature=0,
                   stop_ids=[tokenizer.eot_id])
  assert rc == 0 and continued == whole and out == tokenizer.decode(continued) + "\n"


def test_stop_string_and_sampling_defaults(setup):
  model, tokenizer, path = setup
  rc, full, _ = _run(["--model", path, "--tokenizer", TOKENIZER, "--prompt", "RWKV is", "--seed", "3"])
  assert rc == 0 and len(full) > 10
  stop = full[6:8]
  rc, cut, _ = _run(["--model", path, "--tokenizer", TOKENIZER, "--prompt", "RWKV is", "--seed", "3",
                     "--stop", stop])
  assert rc == 0 and cut == full[:full.index(stop)] + "\n"


def test_errors_are_reported(setup, tmp_path):
  _, _, path = setup
  rc, _, err = _run(["--model", path, "--tokenizer", TOKENIZER])
  assert rc == 2 and "--prompt" in err
  (tmp_path / "junk.npz").write_bytes(b"not a state")
  rc, _, err = _run(["--model", path, "--tokenizer", TOKENIZER, "--prompt", "x",
                     "--state-in", str(tmp_path / "junk.npz")])
  assert rc == 1 and "junk.npz" in err
  np.savez(tmp_path / "other.npz", format=np.array("goosejax-rwkv7-state-v1"),
           att_shift_LBC=np.zeros((1, 1, 8)), wkv_LBHNN=np.zeros((1, 1, 1, 8, 8)),
           ffn_shift_LBC=np.zeros((1, 1, 8)))
  rc, _, err = _run(["--model", path, "--tokenizer", TOKENIZER, "--prompt", "x",
                     "--state-in", str(tmp_path / "other.npz")])
  assert rc == 1 and "needs (3, 1, 128)" in err
  rc, _, err = _run(["--model", str(tmp_path / "missing.pth"), "--tokenizer", TOKENIZER, "--prompt", "x"])
  assert rc == 1 and "missing.pth" in err
