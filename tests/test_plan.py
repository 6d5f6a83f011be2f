"""`goosejax plan`: a config's memory, FLOPs and step time on a TPU slice or GPU node, from the
real compiler (compile-only devices; needs the `tpu` / `cuda` extras, required in CI by
GOOSEJAX_REQUIRE_TARGETS=1 as in test_plan_targets)."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

from goosejax.plan import cli as plan_cli, cost, targets
from goosejax.train import recipe
from goosejax.config import load_config
from goosejax.wkv import wkv7
from targets import require

TINY = ["model.vocab_size=512", "data.ctx_len=128"]


def _figure(text: str, label: str) -> float:
  """The number after `label` at the start of a line of the plan."""
  match = re.search(rf"^\s*{re.escape(label)}\s+([\d.,e+]+)", text, re.MULTILINE)
  assert match, f"no {label!r} line in:\n{text}"
  return float(match[1].replace(",", ""))


def _run(capsys, *argv):
  status = plan_cli.main(["--config", "tiny", *argv])
  out, err = capsys.readouterr()
  return status, out, err


# ----------------------------------------------------------------------------- no compiler needed


@pytest.mark.parametrize("kind, devices, name", [
    ("v5p", 4, "v5p:2x2x1"), ("v5p", 64, "v5p:4x4x4"), ("v4", 32, "v4:2x4x4"),
    ("v5e", 16, "v5e:4x4"), ("v6e", 64, "v6e:8x8"), ("v6e", 256, "v6e:16x16"),
    ("h100", 4, "h100:4"), ("h200", 8, "h200:8"), ("h100", 32, "h100:4x8"),
])
def test_bare_chips_get_the_usual_slice_shape(kind, devices, name):
  assert targets.target_for(kind, devices) == name
  assert targets.parse_target(name).kind == kind


@pytest.mark.parametrize("topology, devices, error", [
    ("v5p", 48, "powers of two"), ("h100", 12, "multiple of 8"), ("v5p", None, "--devices N"),
    ("tpu9", 4, "unknown chip"), ("h100", 0, "--devices 0: expected a positive number"),
    ("h100", -4, "--devices -4: expected a positive number"),
    ("v5p:2x2x1", 0, "--devices 0: expected a positive number"),
])
def test_targets_that_cannot_be_laid_out_are_refused(topology, devices, error):
  with pytest.raises(plan_cli.GoosejaxError, match=error):
    plan_cli.resolve_target(topology, devices)


@pytest.mark.parametrize("chunk", [16, 64])
def test_wkv_formula_matches_the_compiled_kernel_body(chunk):
  """The TPU kernel body run by the Pallas interpreter on CPU compiles to plain XLA ops, which
  the cost analysis counts: the formula's forward plus elementwise work, and forward+backward
  within 15% under the formula (XLA simplifies some of the backward's products away; the
  formula is exactly the chunk math's dot products)."""
  T = 256
  xs = [jax.ShapeDtypeStruct((1, T, 1, 64), jnp.float32) for _ in range(6)]

  def loss(*x):
    y, state = wkv7(*x, impl="pallas", chunk_size=chunk)
    return jnp.sum(y) + jnp.sum(state)

  def flops(fn):
    return cost.program_cost(jax.jit(fn).trace(*xs).lower().compile()).flops / T

  forward, backward = plan_cli.wkv_flops_per_token_head(chunk, 64)
  assert forward <= flops(lambda *x: wkv7(*x, impl="pallas", chunk_size=chunk)) < 1.1 * forward
  assert 0.85 * (forward + backward) < flops(jax.grad(loss, argnums=tuple(range(6)))) <= forward + backward


def test_wkv_formula_at_c64_n64():
  """C = 64, N = 64 as in the docstring and docs/architecture.md#the-chunked-wkv-7-form."""
  assert plan_cli.wkv_flops_per_token_head(64, 64) == (196608, 409600)


# ----------------------------------------------------------------------------- compiled plans


@pytest.mark.slow
def test_tiny_plan_on_a_4_chip_tpu_slice():
  """Every figure: the parameter count, per-device sizes of the fsdp-sharded state, the compiled
  FLOPs (each of the 2 layers counted; remat recomputes the WKV forward, so 4 forward kernel runs
  and 2 backward), the step time at the stated MFU."""
  require("tpu")
  overrides = ["mesh.data=1", "mesh.fsdp=-1", "run.remat=block", *TINY]
  cfg = load_config("tiny", overrides)
  result = plan_cli.make_plan(cfg, targets.target_for("v5p", 4), "tiny")
  text = plan_cli.format_plan(result, cfg, mfu=0.5)

  _, shapes = recipe.abstract_model(cfg)
  parameters = sum(math.prod(s.shape) for s in shapes.values())
  assert result.parameters == _figure(text, "parameters") == parameters
  assert "tiny on v5p:2x2x1: 4 x TPU v5, mesh data=1 fsdp=4 tensor=1" in text
  memory = result.memory
  assert parameters <= memory.parameters < 1.2 * parameters   # fp32 split 4 ways; vectors whole
  assert 2 * memory.parameters <= memory.optimizer < 2.01 * memory.parameters   # Adam's mu, nu
  assert memory.batch == 2 * 8 * 128 * 4 // 4
  assert memory.total > memory.parameters + memory.optimizer + memory.temporaries > 0
  assert memory.fits and memory.capacity == 95 * 2**30 and ": fits" in text

  six_nt = 6 * (parameters - 512 * 128) * 8 * 128
  assert result.flops.six_n_tokens == six_nt
  assert 0.9 * six_nt < result.flops.compiled < 2 * six_nt
  assert result.kernel_runs == {"wkv7_forward_tpu": 4, "wkv7_backward_tpu": 2}
  forward, backward = plan_cli.wkv_flops_per_token_head(64, 64)
  assert result.flops.kernels == 8 * 128 * 2 * (4 * forward + 2 * backward)
  assert result.flops.model == six_nt + 8 * 128 * 2 * 2 * (forward + backward)
  step = float(re.search(r"step ([\d.e+-]+) s", text)[1])
  assert step == pytest.approx(result.flops.model / (0.5 * 459e12 * 4), rel=1e-2)
  assert "at 50% MFU of 459 TFLOP/s" in text and "HFU then" in text
  assert result.flops.hardware == result.flops.compiled + result.flops.kernels


@pytest.mark.slow
def test_a_plan_that_does_not_fit_exits_2_with_the_numbers(capsys):
  """16 sequences of 8192 tokens per v5e chip: fp32 logits alone are 32 GiB. The TPU compiler
  refuses the program; the plan still prints what it knows and the compiler's figure, and
  (--memory) where the temporaries it laid out went: the loss head's logits first."""
  require("tpu")
  status, out, err = _run(capsys, "--topology", "v5e:2x2", "data.ctx_len=8192", "data.batch_size=64",
                          "--memory")
  assert status == 2
  assert "does NOT fit" in out and "RESOURCE_EXHAUSTED" in out
  assert _figure(out, "temporaries") > 16
  assert _figure(out, "6 x N x tokens") > 0
  assert "as laid out before the compiler refused it" in out
  # the breakdown adds up to the figure the compiler's refusal names
  assert _figure(out, "loss head") > 30
  assert _figure(out, "compiler temporaries") == pytest.approx(_figure(out, "temporaries"), abs=0.01)
  assert "no program, so no hardware FLOPs" in out
  message = err.strip().splitlines()[-1]
  assert message.startswith("goosejax plan: error: does not fit:")
  assert "the compiler refused it: RESOURCE_EXHAUSTED" in message


def test_a_refused_program_never_fits_even_under_the_datasheet_memory():
  """The TPU compiler's limit is a little under the datasheet's (15.75 of 16 GiB on v5e)."""
  memory = plan_cli.Memory(0, 0, 0, 15.9 * 2**30, 15.9 * 2**30, 16 * 2**30, refused=True)
  assert not memory.fits
  assert plan_cli.Memory(0, 0, 0, 15.9 * 2**30, 15.9 * 2**30, 16 * 2**30).fits


@pytest.mark.parametrize("topology, overrides, message", [
    ("v5e:2x2", ["mesh.tensor=3"], "4 devices: mesh: 4 devices are not divisible by the fixed axes' product 3"),
    ("v5e:2x2", ["mesh.data=1", "mesh.fsdp=4", "data.batch_size=6"],
     "mesh.data x mesh.fsdp = 4 does not divide data.batch_size / optimizer.grad_accum = 6 / 1"),
    ("v5e:2x2", ["mesh.data=1", "mesh.tensor=4"], "mesh.tensor = 4 does not divide the 2 heads"),
    ("h100:3", ["mesh.data=1", "mesh.fsdp=3", "data.batch_size=6"],
     "mesh.fsdp = 3 does not divide model.n_embd=128"),
])
def test_a_mesh_that_does_not_divide_exits_2_naming_the_axis(capsys, topology, overrides, message):
  require(targets.parse_target(topology).platform)
  status, out, err = _run(capsys, "--topology", topology, *overrides)
  assert status == 2 and out == ""
  assert message in err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v5e:2x2", "--target", "v5p:2x2x1"],
     "--target is given twice ('v5e:2x2' and 'v5p:2x2x1')"),
    (["--topology", "v5e", "--devices", "4", "--devices", "8"], "--devices is given twice (4 and 8)"),
    (["--topology", "v5e", "--devices", "four"], "argument --devices: expected an integer, got 'four'"),
])
def test_plan_flags_are_given_once_and_counts_are_integers(argv, message, capsys):
  with pytest.raises(SystemExit) as refused:
    plan_cli.main(["--config", "tiny", *argv])
  assert refused.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


def test_a_topology_the_compiler_refuses_is_not_blamed_on_a_missing_extra(capsys, monkeypatch):
  require("tpu")
  status, out, err = _run(capsys, "--topology", "v5p:3x3x3")
  assert status == 2 and out == ""
  last = err.strip().splitlines()[-1]
  assert "'v5p:3x3x3': the TPU compiler plugin refuses it" in last and "extra" not in last
  monkeypatch.setitem(targets._COMPILER_PLUGINS, "tpu", "goosejax_test_absent_plugin")
  status, _, err = _run(capsys, "--topology", "v5p:3x3x3")
  assert status == 2 and "the `tpu` extra is not installed" in err.strip().splitlines()[-1]


def test_overrides_may_stand_among_the_flags(capsys):
  """Parsed as train and config parse them (goosejax.config.args): before, between, after."""
  require("tpu")
  status, _, err = _run(capsys, "mesh.data=1", "--topology", "v5e:2x2", "mesh.tensor=4",
                        "--mfu", "0.5", "data.batch_size=8")
  assert status == 2 and "mesh.tensor = 4 does not divide the 2 heads" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_tiny_plan_on_a_4_gpu_h100_node(capsys):
  require("cuda")
  status, out, err = _run(capsys, "--topology", "h100:4", "mesh.data=2", "mesh.tensor=2", *TINY)
  assert status == 0, err
  assert "4 x NVIDIA H100 80GB HBM3, mesh data=2 fsdp=1 tensor=2" in out
  assert "of 79.65 GiB" in out and ": fits" in out   # 81559 MiB, as the driver reports it
  assert "wkv7_backward_triton x2, wkv7_forward_triton x2" in out and "chunk 16" in out
  assert "4 sequences per device;" in out
  assert _figure(out, "compiled XLA ops") > _figure(out, "6 x N x tokens") * 0.9
  forward, backward = plan_cli.wkv_flops_per_token_head(16, 64)   # read off Triton's [B, J, Q, H*N]
  assert _figure(out, "WKV kernels") == pytest.approx(8 * 128 * 2 * 2 * (forward + backward), rel=1e-3)
  assert "at 50% HFU" in out


# ----------------------------------------------------------------------------- hardware FLOPs


def _plan_with(flops: plan_cli.Flops, devices: int = 4, peak: float = 100e12) -> plan_cli.Plan:
  memory = plan_cli.Memory(0, 0, 0, 0, 0, 1)
  return plan_cli.Plan("tiny", "v5p:2x2x1", "tpu", "TPU v5", devices, {"data": devices}, 10, 1,
                       1000, memory, flops, peak, 64, {}, 1.0)


def test_the_step_time_comes_from_hardware_flops_at_hfu_or_model_flops_at_mfu():
  flops = plan_cli.Flops(compiled=9e12, kernels=1e12, six_n_tokens=6e12, model=8e12)
  plan = _plan_with(flops)
  assert flops.hardware == 10e12
  at_hfu = plan_cli.estimate_step(plan, hfu=0.5)
  assert at_hfu.seconds == pytest.approx(10e12 / (0.5 * 100e12 * 4))
  assert (at_hfu.basis, at_hfu.hfu, at_hfu.mfu) == ("HFU", pytest.approx(0.5), pytest.approx(0.4))
  assert at_hfu.tokens_per_second == pytest.approx(1000 / at_hfu.seconds)
  at_mfu = plan_cli.estimate_step(plan, mfu=0.4)
  assert at_mfu.seconds == pytest.approx(at_hfu.seconds) and at_mfu.basis == "MFU"
  assert at_mfu.seconds == pytest.approx(plan.step_seconds(0.4))
  refused = plan_cli.estimate_step(_plan_with(plan_cli.Flops(None, 0.0, 6e12, 8e12)), hfu=0.5)
  assert (refused.basis, refused.hfu) == ("MFU", None)
  assert refused.seconds == pytest.approx(8e12 / (0.5 * 100e12 * 4))
  with pytest.raises(ValueError):
    plan_cli.estimate_step(plan, hfu=0.5, mfu=0.4)


def test_hfu_and_mfu_are_one_or_the_other(capsys):
  with pytest.raises(SystemExit) as exited:
    plan_cli.main(["--config", "tiny", "--topology", "v5e:2x2", "--hfu", "0.5", "--mfu", "0.4"])
  assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_hardware_flops_count_the_recomputation_of_full_remat():
  """run.remat=full recomputes each layer's forward in the backward: more hardware FLOPs than
  remat=none for the same model FLOPs, and at least the model FLOPs; the step at a given HFU
  takes longer."""
  require("tpu")
  plans = {remat: plan_cli.make_plan(load_config("tiny", [*TINY, f"run.remat={remat}"]), "v5p:2x2x1", "tiny")
           for remat in ("none", "full")}
  none, full = plans["none"].flops, plans["full"].flops
  assert none.model == full.model
  assert full.hardware >= full.model and full.hardware > 1.1 * none.hardware
  assert plans["full"].kernel_runs["wkv7_forward_tpu"] > plans["none"].kernel_runs["wkv7_forward_tpu"]
  step = lambda remat: plan_cli.estimate_step(plans[remat], hfu=0.5).seconds
  assert step("full") > step("none")


@pytest.mark.slow
def test_sequence_parallel_kernel_flops_count_doubled_rows_and_chunk_padding():
  """mesh.sequence=4 splits each 128-token sequence into spans of 32 tokens; the TPU kernel runs
  every span over twice the rows (from state 0 and from I) and pads it to a 64-token chunk:
  2 x 4 x 64 / 128 = 4 times the unsplit kernels' work, on as many kernel runs."""
  require("tpu")
  plans = [plan_cli.make_plan(load_config("tiny", [*TINY, *extra]), "v5e:2x2", "tiny")
           for extra in ([], ["mesh.data=1", "mesh.sequence=4"])]
  unsplit, split = plans
  assert split.mesh["sequence"] == 4 and split.kernel_runs == unsplit.kernel_runs
  spans, span, chunk = 4, 128 // 4, 64
  padded = spans * math.ceil(span / chunk) * chunk
  assert split.flops.kernels == pytest.approx(unsplit.flops.kernels * 2 * padded / 128)
  assert split.flops.model == unsplit.flops.model and split.flops.hardware > unsplit.flops.hardware


def test_a_chunk_size_the_kernel_does_not_take_is_noted_not_swapped_silently():
  from goosejax.config import ModelConfig
  model = ModelConfig(wkv_chunk_size=64)
  note = plan_cli._chunk_substitution(model, "cuda")
  assert "wkv_chunk_size=64" in note and f"runs it at {plan_cli.kernel_chunk_size(model, 'cuda')}" in note
  assert plan_cli._chunk_substitution(model, "tpu") == ""          # Mosaic takes 64
  assert plan_cli._chunk_substitution(ModelConfig(wkv_chunk_size=32), "cuda") == ""
