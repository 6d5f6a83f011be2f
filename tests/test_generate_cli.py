"""`goosejax generate`: streamed text equals generate(); prompt-state caching; stop strings; errors."""
import io
import os
import select
import signal
import subprocess
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
from goosejax.infer import generate
from goosejax.infer.state_io import load_state, save_state
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


def test_errors_are_one_line_and_exit_2(setup, tmp_path):
  model, _, path = setup
  base = ["--model", path, "--tokenizer", TOKENIZER]

  def fails(args, *names):
    rc, out, err = _run(base + args)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(name in err for name in names), err

  fails([], "--prompt")
  for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"),
                      ("--presence-penalty", "nan"), ("--frequency-penalty", "-inf"),
                      ("--penalty-decay", "nan")):
    fails(["--prompt", "x", f"{flag}={value}"], f"{flag[2:].replace('-', '_')}={value}")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  fails(["--prompt-file", str(tmp_path / "latin1.txt")], "latin1.txt", "UTF-8")
  (tmp_path / "junk.npz").write_bytes(b"not a state")
  fails(["--prompt", "x", "--state-in", str(tmp_path / "junk.npz")], "junk.npz", ".npz archive")
  rc, _, err = _run(base + ["--prompt", "x", "--state-in", str(tmp_path / "junk.npz")])
  assert "allow_pickle" not in err     # numpy's advice, wrong for a state file
  save_state(tmp_path / "good.npz", model.init_state(1))
  whole = (tmp_path / "good.npz").read_bytes()
  for cut in (len(whole) // 2, len(whole) - 30):
    (tmp_path / "truncated.npz").write_bytes(whole[:cut])
    fails(["--prompt", "x", "--state-in", str(tmp_path / "truncated.npz")], "truncated.npz")
  np.save(tmp_path / "array.npy", np.zeros(3))
  fails(["--prompt", "x", "--state-in", str(tmp_path / "array.npy")], "array.npy", ".npz archive")
  np.savez(tmp_path / "other.npz", format=np.array("goosejax-rwkv7-state-v1"),
           att_shift_LBC=np.zeros((1, 1, 8)), wkv_LBHNN=np.zeros((1, 1, 1, 8, 8)),
           ffn_shift_LBC=np.zeros((1, 1, 8)))
  fails(["--prompt", "x", "--state-in", str(tmp_path / "other.npz")], "other.npz", "needs (3, 1, 128)")
  rc, _, err = _run(["--model", str(tmp_path / "missing.pth"), "--tokenizer", TOKENIZER, "--prompt", "x"])
  assert rc == 2 and "missing.pth" in err and err.count("\n") == 1
  rc, _, err = _run(["--model", path, "--tokenizer", "world", "--prompt", "x"])
  assert rc == 2 and "'world' has 65530 ids but the model only 320" in err and err.count("\n") == 1


def test_counts_beyond_int32_and_empty_stop_strings_are_refused(setup):
  _, _, path = setup
  base = ["--model", path, "--tokenizer", TOKENIZER, "--prompt", "x"]
  for value in ("1e12", "3e9", "2147483648", "-1"):
    rc, out, err = _run(base + ["--max-new-tokens", value])
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert "max_new_tokens=" in err and "2147483647" in err, err
  with pytest.raises(SystemExit) as exit_info:   # argparse's usage line and error, exit 2
    _run(base + ["--max-new-tokens", "2.5"])
  assert exit_info.value.code == 2
  rc, out, err = _run(base + ["--stop", "\n", "--stop", ""])
  assert rc == 2 and out == "" and err.count("\n") == 1 and "--stop ''" in err, err


PEAK_RSS = ("import resource, sys; from goosejax.cli import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr); "
            "sys.exit(rc)")


def test_the_largest_count_allocates_per_block(setup):
  """2**31 - 1 new tokens, stopped after two: an up-front [1, max_new_tokens] int32 buffer
  would be 8.6 GB; one per streamed block is 20 bytes."""
  model, tokenizer, path = setup
  prompt = tokenizer.encode("x")
  first_three = generate(model, prompt, 3, temperature=0)
  process = subprocess.run(
      [sys.executable, "-c", PEAK_RSS, "generate", "--model", path, "--tokenizer", TOKENIZER,
       "--prompt", "x", "--max-new-tokens", "2147483647", "--stop-id", str(first_three[2]),
       "--no-stop-eot"] + GREEDY[:-4],
      capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert process.returncode == 0, process.stderr[-2000:]
  expected = generate(model, prompt, 2147483647, temperature=0, stop_ids=[first_three[2]])
  assert process.stdout == tokenizer.decode(expected) + "\n" and len(expected) == 2
  peak_mib = int(process.stderr.strip().splitlines()[-1])
  assert peak_mib < 3000, f"peak RSS {peak_mib} MiB"


# `goosejax` with Ctrl-C raising KeyboardInterrupt, as at a terminal: a shell's background job
# (e.g. CI started with `cmd &`) inherits SIGINT ignored, and Python then keeps ignoring it.
SIGINT_AS_AT_A_TERMINAL = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                           "from goosejax.cli import main; sys.exit(main(sys.argv[1:]))")


def test_ctrl_c_while_streaming_exits_130_with_one_line(setup):
  _, _, path = setup
  process = subprocess.Popen(
      [sys.executable, "-c", SIGINT_AS_AT_A_TERMINAL, "generate", "--model", path, "--tokenizer",
       TOKENIZER, "--prompt", "The", "--max-new-tokens", "100000", "--no-stop-eot", "--block-size", "4"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    ready, _, _ = select.select([process.stdout], [], [], 120)
    assert ready, "no streamed output within 120 s"
    first = os.read(process.stdout.fileno(), 1)      # some text was streamed: mid-generation
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)   # ~1 s on a quiet machine; CI may be loaded
  finally:
    process.kill()
  assert first and process.returncode == 130
  # (JAX plugins may log to stderr first; what goosejax prints is the last line.)
  assert ("\n" + err.decode()).endswith("\ngoosejax generate: interrupted\n")
  assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
  assert out.endswith(b"\n")       # the streamed line is closed before the shell prompt
