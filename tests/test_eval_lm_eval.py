"""The lm-eval adapter ("goosejax") returns the log-likelihoods `goosejax eval` and the official
runtime give, and runs a small local task end to end (no downloads)."""
import io
import json
import math
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from flax import nnx

import goosejax
from goosejax import cli
from goosejax.convert.official import official_to_params
from goosejax.infer import generate
from goosejax.model import RWKV7
from goosejax.model.params import load_param_dict

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from goosejax.eval.lm_eval_adapter import GoosejaxLM

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_generate_fixtures import CHECKPOINT, random_checkpoint  # noqa: E402

OFFICIAL = json.loads((FIXTURES / "generate_official" / "eval.json").read_text())
TOKENIZER_PATH = FIXTURES / "generate_official" / "tokenizer.json"


@pytest.fixture(scope="module")
def lm():
  cfg, params = official_to_params(random_checkpoint(**CHECKPOINT))
  model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
  load_param_dict(model, params)
  return GoosejaxLM(model=model, tokenizer=goosejax.load_tokenizer(TOKENIZER_PATH), batch_size=3,
                    chunk_len=16)


def _requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_registered_under_goosejax():
  assert get_model("goosejax") is GoosejaxLM


def test_loglikelihood_equals_official_lambada_scores(lm):
  case = OFFICIAL["lambada"]
  pairs = [(t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in case["texts"]]
  results = lm.loglikelihood(_requests("loglikelihood", pairs))
  for (logprob, greedy), ref, correct in zip(results, case["logprob"], case["correct"]):
    assert logprob == pytest.approx(ref, rel=1e-5) and greedy == correct
  # A trailing space in the context moves to the continuation, as lm-eval's causal models do.
  moved = lm.loglikelihood(_requests("loglikelihood", [(pairs[0][0] + " ", pairs[0][1][1:])]))
  assert moved[0][0] == pytest.approx(results[0][0], rel=1e-6)


def test_rolling_loglikelihood_equals_eval_ppl(lm):
  case = OFFICIAL["documents"]
  results = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in case["texts"]]))
  assert results == pytest.approx(case["logprob"], rel=1e-5)


def test_generate_until_is_greedy_and_cuts_at_the_stop_string(lm):
  prompt = "The Goose models"
  ids = generate(lm.model, [0] + lm.tokenizer.encode(prompt), 12, temperature=0, stop_ids=[0])
  text = lm.tokenizer.decode(ids)
  stop = text[5:7]
  out = lm.generate_until(_requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12}),
                                                        (prompt, {"until": [], "max_gen_toks": 12})]))
  assert out == [text[:text.index(stop)], text]


def test_a_local_task_end_to_end(lm, tmp_path):
  data = tmp_path / "mini_lambada.jsonl"
  data.write_text("".join(json.dumps({"text": t}) + "\n" for t in OFFICIAL["lambada"]["texts"]))
  (tmp_path / "mini_lambada.yaml").write_text(f"""
task: goosejax_mini_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
  results = lm_eval.simple_evaluate(model=lm, tasks=["goosejax_mini_lambada"],
                                    task_manager=TaskManager(include_path=str(tmp_path)))
  metrics = results["results"]["goosejax_mini_lambada"]
  assert metrics["acc,none"] == pytest.approx(OFFICIAL["lambada"]["accuracy"])
  assert math.log(metrics["perplexity,none"]) == pytest.approx(math.log(OFFICIAL["lambada"]["perplexity"]),
                                                               rel=1e-5)


def test_an_unknown_task_is_one_line_with_close_names_before_the_model_loads(tmp_path):
  err = io.StringIO()
  with redirect_stderr(err):     # the model path does not exist: the task check comes first
    rc = cli.main(["eval", "lm-eval", "--model", str(tmp_path / "absent.pth"),
                   "--tasks", "lambada_openai,lambada_opnai", "--quiet"])
  assert rc == 2 and err.getvalue().count("\n") == 1, err.getvalue()
  assert "unknown lm-eval task 'lambada_opnai'" in err.getvalue()
  assert "did you mean lambada_openai" in err.getvalue()
