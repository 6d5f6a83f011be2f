"""Repeated calls of every documented inference entry point compile nothing after the first.

The only cache is jax's own: the compiled functions are module-level and take the weights as
arguments, so a fresh `Generator` per `generate(model, ...)` call, another scoring call or
lm-eval request, and the user's own `jax.jit` of the model reuse the programs of the first
call. Counted with jax.monitoring's backend-compile event (not timed).
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import goosejax
from goosejax.eval import perplexity, score_sequences
from goosejax.infer import Generator
from goosejax.model import functional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_infer import TOKENS, build  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
compiled = [0]


def _count(event: str, duration: float, **kwargs) -> None:
  if event == COMPILE_EVENT:
    compiled[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count)


def compiles_when_repeated(call, repeats: int = 3) -> int:
  """Backend compiles during `repeats` calls of `call` after a first (warming) one."""
  call()
  before = compiled[0]
  for _ in range(repeats):
    call()
  return compiled[0] - before


@pytest.fixture(scope="module")
def model():
  return build()


PROMPTS = [[0, 5, 9, 17], [0, 3]]


def test_the_counter_sees_compiles(model):
  """A new jitted function compiles once per call: the probe would catch a per-call jit."""
  assert compiles_when_repeated(lambda: jax.jit(lambda x: x * 2 + 1)(jnp.ones(3))) == 3


def test_generate_compiles_nothing_after_the_first_call(model):
  greedy = lambda: goosejax.generate(model, PROMPTS, 5, temperature=0)
  assert compiles_when_repeated(greedy) == 0
  streamed = lambda: goosejax.generate(model, PROMPTS[0], 9, temperature=0.8, top_p=0.9, seed=1,
                                       callback=lambda ids: None, block_size=4)
  assert compiles_when_repeated(streamed) == 0


def test_a_held_generator_compiles_nothing_after_the_first_call(model):
  generator = Generator(model)
  assert compiles_when_repeated(lambda: generator.generate(PROMPTS, 5, temperature=0)) == 0
  assert compiles_when_repeated(lambda: Generator(model).generate(PROMPTS, 5, temperature=0)) == 0


def test_scoring_and_perplexity_compile_nothing_after_the_first_call(model):
  documents = [[5, 9, 17, 4, 4, 8], [3, 2, 1], [7] * 11]
  assert compiles_when_repeated(lambda: score_sequences(model, [[0] + d for d in documents],
                                                        batch_size=2, chunk_len=4)) == 0
  assert compiles_when_repeated(lambda: perplexity(model, documents, batch_size=2, chunk_len=4)) == 0


def test_lm_eval_adapter_compiles_nothing_after_the_first_request():
  from lm_eval.api.instance import Instance

  from goosejax.convert.official import official_to_params
  from goosejax.eval.lm_eval_adapter import GoosejaxLM
  from goosejax.model import RWKV7
  from goosejax.model.params import load_param_dict
  from make_generate_fixtures import CHECKPOINT, random_checkpoint
  from test_eval_lm_eval import TOKENIZER_PATH

  cfg, params = official_to_params(random_checkpoint(**CHECKPOINT))   # the tokenizer's vocab
  model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
  load_param_dict(model, params)
  lm = GoosejaxLM(model=model, tokenizer=goosejax.load_tokenizer(TOKENIZER_PATH), batch_size=2,
                  chunk_len=8)
  pairs = [Instance("loglikelihood", {}, ("The goose", " flies"), i) for i in range(2)]
  assert compiles_when_repeated(lambda: lm.loglikelihood(pairs)) == 0
  until = [Instance("generate_until", {}, ("The goose", {"until": ["\n"], "max_gen_toks": 6}), 0)]
  assert compiles_when_repeated(lambda: lm.generate_until(until)) == 0


def test_the_model_under_the_users_jit_compiles_once(model):
  params = functional.model_params(model)
  state = model.init_state(TOKENS.shape[0])
  forward = jax.jit(functional.forward)
  assert compiles_when_repeated(lambda: jax.block_until_ready(forward(params, TOKENS, state))) == 0
  # The NNX module itself, split into a jitted function of (graph, state): the same.
  call = nnx.jit(lambda m, tokens, s: m(tokens, s))
  assert compiles_when_repeated(lambda: jax.block_until_ready(call(model, TOKENS, state))) == 0
