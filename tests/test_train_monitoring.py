"""Monitoring a run: profiler traces (run.profile_steps), evaluations during training
(run.eval_tasks), Weights & Biases in offline mode (run.wandb_*). Tiny runs that share
tests/test_train_loop.py's compiled steps."""
import json
import re
import sys
import time

import jax
import pytest

import goosejax
from goosejax import sharding
from goosejax.config import ConfigError, MeshConfig
from goosejax.data.tokenizer import load_tokenizer
from goosejax.errors import GoosejaxError
from goosejax.eval import evaluate_lambada, load_documents, perplexity
from goosejax.train import recipe
from goosejax.train.eval_tasks import load_eval_tasks, run_eval_tasks
from goosejax.train.metrics import read_metrics
from test_train_loop import run, tiny
from test_eval import TOKENIZER_PATH

# Upper-case words: the fixture tokenizer gives them ids below the tiny model's 256.
WORDS = ["ZQ", "XJ", "VK", "QJ", "ZX", "KV", "JQ", "XV", "QZ", "VJ"]


def uppercase_texts(n, length, seed):
  return [" ".join(WORDS[(seed + 7 * i + 3 * j * j) % len(WORDS)] for j in range(length))
          for i in range(n)]


def test_profile_steps_trace_those_steps_and_name_the_file(tmp_path):
  result, output = run(tmp_path, ["run.profile_steps=[3, 4]"], stop_at_step=5)
  assert result.step == 5
  traces = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1
  assert list(traces[0].parent.glob("perfetto_trace.json.gz"))
  assert f"profile of steps 3-4: {traces[0]}" in output
  profile = jax.profiler.ProfileData.from_file(str(traces[0]))
  steps = sorted(dict(event.stats)["step_num"] for plane in profile.planes for line in plane.lines
                 for event in line.events if event.name == "train")
  assert steps == [3, 4]


def test_profile_cut_short_by_a_stop_and_resumed_inside_the_range(tmp_path):
  _, output = run(tmp_path, ["run.profile_steps=[2, 4]"], stop_at_step=2)
  first = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(first) == 1 and f"profile of steps 2-2: {first[0]}" in output
  time.sleep(1.1)                 # the profiler names its folder by the second
  _, output = run(tmp_path, ["run.profile_steps=[2, 4]"], stop_at_step=5)
  second = [p for p in (tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb") if p != first[0]]
  assert len(second) == 1 and f"profile of steps 3-4: {second[0]}" in output


def test_profile_steps_are_checked(tmp_path):
  for value, problem in (("[3]", r"expected \[start, stop\]"), ("[4, 2]", "1 <= start <= stop"),
                         ("[20, 30]", r"starts after the last step \(run.steps=12\)")):
    with pytest.raises(ConfigError, match=rf"run.profile_steps=.*{problem}"):
      tiny([f"run.profile_steps={value}"])


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_files")
  tokenizer = load_tokenizer(str(TOKENIZER_PATH))
  docs, lambada = uppercase_texts(5, 12, seed=1), uppercase_texts(6, 8, seed=2)
  assert max(max(tokenizer.encode(t)) for t in docs + lambada) < 256
  (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
  (root / "lambada_mini.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lambada))
  return root, tokenizer


def test_eval_tasks_score_the_parameters_of_that_step(tmp_path, eval_files):
  root, tokenizer = eval_files
  tasks = f"run.eval_tasks=[ppl:{root / 'docs.jsonl'}, lambada:{root / 'lambada_mini.jsonl'}]"
  result, output = run(tmp_path, [tasks, f"data.tokenizer={TOKENIZER_PATH}",
                                  "run.tensorboard=true"], stop_at_step=6)
  assert result.step == 6
  logged = next(r for r in read_metrics(tmp_path) if "eval/ppl/docs/perplexity" in r)
  assert logged["step"] == 6
  assert set(logged) == {"step", "eval/ppl/docs/loss", "eval/ppl/docs/perplexity",
                         "eval/ppl/docs/bits_per_byte", "eval/lambada/lambada_mini/accuracy",
                         "eval/lambada/lambada_mini/perplexity"}
  assert re.search(r"step 6: eval ppl/docs loss \S+ perplexity \S+ bits_per_byte \S+ \| "
                   r"lambada/lambada_mini accuracy \S+ perplexity \S+", output)
  # The same numbers as `goosejax eval` on the step-6 checkpoint.
  model = goosejax.load_pretrained(tmp_path)
  documents, n_bytes = load_documents(root / "docs.jsonl", tokenizer, vocab_size=256)
  expected = perplexity(model, documents, n_bytes)
  assert logged["eval/ppl/docs/perplexity"] == pytest.approx(expected.perplexity, rel=1e-4)
  assert logged["eval/ppl/docs/bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-4)
  texts = [json.loads(line)["text"] for line in (root / "lambada_mini.jsonl").read_text().splitlines()]
  lambada = evaluate_lambada(model, tokenizer, texts)
  assert logged["eval/lambada/lambada_mini/accuracy"] == lambada.accuracy
  assert logged["eval/lambada/lambada_mini/perplexity"] == pytest.approx(lambada.perplexity, rel=1e-4)
  events = next((tmp_path / "tensorboard").glob("events.out.tfevents.*")).read_bytes()
  assert b"eval/ppl/docs/perplexity" in events and b"eval/lambada/lambada_mini/accuracy" in events


def test_eval_tasks_on_parameters_split_over_a_mesh_match_one_device(eval_files):
  """Evaluation reads the training parameters as they are sharded (fsdp x tensor here)."""
  root, _ = eval_files
  cfg = tiny()
  tasks = load_eval_tasks([f"ppl:{root / 'docs.jsonl'}", f"lambada:{root / 'lambada_mini.jsonl'}"],
                          str(TOKENIZER_PATH), 256, max_documents=4)
  graphdef, shapes = recipe.abstract_model(cfg)
  tx = recipe.make_optimizer(cfg.optimizer, cfg.run.steps, list(shapes))
  results = []
  for mesh_config, n_devices in ((MeshConfig(data=1), 1), (MeshConfig(data=1, fsdp=4, tensor=2), 8)):
    mesh = sharding.make_mesh(mesh_config, jax.devices()[:n_devices])
    state, _ = recipe.init_train_state(cfg, tx, mesh)
    split = [name for name, value in state.params.items() if not value.sharding.is_fully_replicated]
    assert bool(split) == (n_devices > 1)
    results.append(run_eval_tasks(tasks, recipe.merge_params(graphdef, state.params)))
  assert results[0].keys() == results[1].keys() and len(results[0]) == 5
  for key, value in results[0].items():
    assert results[1][key] == pytest.approx(value, rel=1e-5), key


def test_eval_tasks_are_checked_before_training(tmp_path):
  with pytest.raises(ConfigError, match=r"run.eval_tasks entry 'bleu:x.jsonl': expected "
                                        r"'ppl:FILE' or 'lambada:FILE'"):
    tiny(["run.eval_tasks=[bleu:x.jsonl]"])
  with pytest.raises(GoosejaxError, match=r"missing\.jsonl: file not found"):
    run(tmp_path, [f"run.eval_tasks=[lambada:{tmp_path / 'missing.jsonl'}]"])
  assert not list(tmp_path.glob("checkpoints/*"))


def wandb_records(run_dir, needles, timeout=60.0):
  """The bytes of the run's offline .wandb logs, once all `needles` are in them (W&B's
  service process writes them after `finish()` returns)."""
  deadline = time.monotonic() + timeout
  while True:
    data = b"".join(p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    if all(n in data for n in needles) or time.monotonic() > deadline:
      return data
    time.sleep(0.2)


def test_wandb_offline_logs_scalars_and_config_and_resumes_the_same_run(tmp_path, monkeypatch):
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(name, str(tmp_path / "home" / name))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  run_dir = tmp_path / "run"
  settings = ["run.wandb_project=goosejax-tests", "run.wandb_tags=[tiny, ci]"]
  _, output = run(run_dir, settings, stop_at_step=2)
  run_id = (run_dir / "wandb_run_id").read_text().strip()
  assert f"W&B run {run_id} in project goosejax-tests: offline, under {run_dir / 'wandb'}" in output
  result, output = run(run_dir, settings, stop_at_step=6)
  assert result.step == 6 and f"W&B run {run_id}" in output
  assert (run_dir / "wandb_run_id").read_text().strip() == run_id
  runs = sorted((run_dir / "wandb").glob("offline-run-*"))
  assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
  metrics = read_metrics(run_dir)
  last_loss = repr(next(r["loss"] for r in metrics if r.get("step") == 6 and "loss" in r))
  val_loss = repr(next(r["val_loss"] for r in metrics if "val_loss" in r))
  needles = [b"train/loss", b"train/grad_norm", b"val/loss", b"perf/mfu", b"n_layer",
             last_loss.encode(), val_loss.encode()]
  data = wandb_records(run_dir, needles)
  assert [n for n in needles if n not in data] == []


def test_wandb_requested_but_not_installed_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)     # import wandb raises ImportError
  with pytest.raises(ConfigError, match=r"^run.wandb_project='p': Weights & Biases is not "
                                        r"installed; pip install 'goosejax\[wandb\]'"):
    run(tmp_path, ["run.wandb_project=p"])
  assert not (tmp_path / "config.json").exists()


def test_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch):
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.delenv("WANDB_MODE", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))               # no ~/.netrc login
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
  with pytest.raises(ConfigError, match=r"^run.wandb_project='p': W&B did not start: .*API key"
                                        r".* \(`wandb login`, or run.wandb_mode=offline\)$"):
    run(tmp_path / "run", ["run.wandb_project=p", "run.wandb_mode=online"])
