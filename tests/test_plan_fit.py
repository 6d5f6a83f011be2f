"""`goosejax plan --fit`: the search's order and pruning with a fake compiler, then the wiring
with the real one (tiny on v5e; needs the `tpu` extra, required in CI)."""
from __future__ import annotations

import typing

import pytest

from goosejax.config import load_config, schema
from goosejax.config import cli as config_cli
from goosejax.plan import cli as plan_cli, fit
from targets import require

GIB = 2**30


def _fake_plan(total_gib: float, hardware: float, tokens: int = 1000) -> plan_cli.Plan:
  memory = plan_cli.Memory(0, 0, 0, int(total_gib * GIB), int(total_gib * GIB), 16 * GIB)
  flops = plan_cli.Flops(compiled=hardware, kernels=0.0, six_n_tokens=1.0, model=1.0)
  return plan_cli.Plan("tiny", "v5e:2x2", "tpu", "TPU v5 lite", 4, {"data": 4}, 10, 1, tokens,
                       memory, flops, 100e12, 64, {}, 1.0)


class FakeCompiler:
  """Memory: 40 GiB / grad_accum, halved by the fused head; 'none' and 'block' need more than
  the rest. Hardware FLOPs grow with recomputation. Records what was compiled."""
  NEEDS = {"none": 2.0, "block": 1.5}
  RECOMPUTE = {"none": 1.0, "block": 1.05, "save_wkv": 1.2}

  def __init__(self, cannot_compile=(), scale_gib=20.0):
    self.compiled, self.cannot_compile, self.scale_gib = [], set(cannot_compile), scale_gib

  def __call__(self, cfg) -> plan_cli.Plan:
    run, accum = cfg.run, cfg.optimizer.grad_accum
    self.compiled.append((run.remat, accum, run.loss_vocab_tile))
    if run.remat in self.cannot_compile:
      raise NotImplementedError(f"{run.remat}: no host memory space on this target\nmore detail")
    total = self.scale_gib / accum * self.NEEDS.get(run.remat, 1.0) * (0.5 if run.loss_vocab_tile else 1.0)
    return _fake_plan(total, 1e15 * self.RECOMPUTE.get(run.remat, 1.33))


def _search(cfg, compiler, rows=8):
  estimate = lambda plan: plan_cli.estimate_step(plan, hfu=0.5)
  return fit.search(cfg, rows, compiler, estimate=estimate)


def test_policies_come_from_the_schema_least_recomputation_first():
  policies = fit.remat_policies()
  assert sorted(policies) == sorted(typing.get_args(schema.Remat))
  assert policies[0] == "none"
  for lighter, heavier in [("none", "full"), ("save_wkv", "full")]:
    if lighter in policies and heavier in policies:
      assert policies.index(lighter) < policies.index(heavier)
  assert fit.micro_batch_counts(12) == [1, 2, 3, 4, 6, 12]


def test_search_stops_at_each_policys_first_fit_and_prunes_slower_ones():
  """none needs 40 GiB at g=1 unfused, 20 fused, 10 fused at g=2: the first fit. Later policies
  are tried only at g=1 (fewer micro-batches); block fits there fused (15 GiB) but runs 5% more
  hardware FLOPs, so none at g=2 is the faster estimate and wins."""
  cfg = load_config("tiny")
  compiler = FakeCompiler()
  tried = _search(cfg, compiler)
  assert compiler.compiled[:4] == [("none", 1, 0), ("none", 1, 4096), ("none", 2, 0), ("none", 2, 4096)]
  assert all(accum == 1 for remat, accum, _ in compiler.compiled[4:])   # pruned to g < 2
  assert ("block", 1, 4096) in compiler.compiled and tried[-1].candidate.grad_accum == 1
  winner = fit.best(tried)
  assert winner.fits and winner.candidate == fit.Candidate("none", 2, 4096)
  assert fit.chosen_line(winner) == ("fit: run.remat=none optimizer.grad_accum=2 "
                                     "run.loss_vocab_tile=4096")


def test_counts_that_cannot_fit_are_not_compiled():
  """A miss at g needing M of D GiB rules out every g' < g·M/D (what a micro-batch holds
  shrinks at most as 1/g'); the leanest head's miss sets the bound. minimal is full's program."""
  cfg = load_config("tiny")
  compiler = FakeCompiler(scale_gib=120.0)   # none: 240 GiB / g unfused, 120 fused
  _search(cfg, compiler, rows=16)
  none = [c for c in compiler.compiled if c[0] == "none"]
  # fused at g=1 is 7.5x the 16 GiB: g=2, 4 skipped; at g=8 the fused head (15 GiB) fits.
  assert none == [("none", 1, 0), ("none", 1, 4096), ("none", 8, 0), ("none", 8, 4096)]
  assert "minimal" not in fit.searched_policies() and "full" in fit.searched_policies()
  assert not any(remat == "minimal" for remat, _, _ in compiler.compiled)


def test_the_fastest_fitting_candidate_wins():
  """none fits at once: nothing else is compiled (every later policy recomputes more)."""
  cfg = load_config("tiny")
  compiler = FakeCompiler(scale_gib=5.0)
  tried = _search(cfg, compiler)
  assert compiler.compiled == [("none", 1, 0)]
  assert fit.chosen_line(fit.best(tried)) == "fit: run.remat=none optimizer.grad_accum=1"
  # Two fits: the one with more tokens/s at the same HFU is chosen, whatever the order tried.
  plan = _fake_plan(1.0, 1e15)
  slow = fit.Tried(fit.Candidate("full", 1, 0), plan,
                   plan_cli.estimate_step(_fake_plan(1.0, 2e15), hfu=0.5))
  fast = fit.Tried(fit.Candidate("save_wkv", 1, 0), plan, plan_cli.estimate_step(plan, hfu=0.5))
  assert fit.best([slow, fast]) is fast


def test_a_policy_the_target_cannot_compile_is_skipped_with_the_reason():
  cfg = load_config("tiny")
  compiler = FakeCompiler(cannot_compile={"none"})
  tried = _search(cfg, compiler)
  skipped = [t for t in tried if t.skipped]
  assert len(skipped) == 1 and skipped[0].candidate.remat == "none"
  assert skipped[0].skipped == "NotImplementedError: none: no host memory space on this target"
  assert "skipped: NotImplementedError" in fit.format_tried(skipped[0])
  assert fit.best(tried) is not None


def test_nothing_fits_names_the_closest_miss():
  cfg = load_config("tiny")
  tried = _search(cfg, FakeCompiler(), rows=1)   # g=1 only: the fused head's 10 GiB fits
  misses = [t for t in tried if not t.fits]
  message = fit.nothing_fits(misses, cfg)
  assert message.startswith("nothing fits with data.batch_size=8 x data.ctx_len=128; closest: ")
  closest = fit.closest_miss(misses)
  assert closest.candidate.overrides() in message
  assert f"needs {closest.plan.memory.total / GIB:.2f} of 16.00 GiB" in message


def test_a_batch_that_does_not_split_over_the_chips_names_the_nearest_that_do():
  assert fit.batch_split_problem(256, 64) is None
  assert fit.batch_split_problem(240, 64) == (
      "data.batch_size=240 does not split over the 64 batch shards (mesh.data x mesh.fsdp): "
      "nearest batch sizes that do: 192 or 256")
  assert fit.batch_split_problem(8, 64).endswith("nearest batch sizes that do: 64")


def test_plan_fit_refuses_a_batch_that_does_not_split(capsys):
  """The 1.5B preset's 240 rows on 64 chips: said before anything compiles."""
  require("tpu")
  status = plan_cli.main(["--config", "rwkv7-1.5b", "--topology", "v6e:8x8", "--fit",
                          "mesh.data=1", "mesh.fsdp=-1", "data.batch_size=240"])
  out, err = capsys.readouterr()
  assert status == 2 and out == ""
  assert err.strip().splitlines()[-1] == (
      "goosejax plan: error: v6e:8x8: data.batch_size=240 does not split over the 64 batch "
      "shards (mesh.data x mesh.fsdp): nearest batch sizes that do: 192 or 256")


# ----------------------------------------------------------------------------- real compiles


FIT_SHAPE = ["mesh.data=1", "mesh.fsdp=-1", "data.ctx_len=8192", "data.batch_size=32"]


@pytest.mark.slow
def test_plan_fit_on_v5e_prints_candidates_and_pasteable_overrides(capsys):
  """8 sequences of 8192 tokens per v5e chip: the unfused head's fp32 logits alone are 16 GiB,
  so remat none with one micro-batch does not fit; the last line is overrides that fit and that
  `goosejax config` accepts."""
  require("tpu")
  status = plan_cli.main(["--config", "tiny", "--topology", "v5e:2x2", "--fit", *FIT_SHAPE])
  out, err = capsys.readouterr()
  assert status == 0, err
  lines = out.strip().splitlines()
  assert lines[1] == fit.HEADER
  first = lines[2].split()
  assert first[:3] == ["none", "1", "0"] and lines[2].endswith("refused by the compiler")
  last = lines[-1]
  assert last.startswith("fit: run.remat=") and "optimizer.grad_accum=" in last
  overrides = last.removeprefix("fit: ").split()
  assert config_cli.main(["--config", "tiny", *FIT_SHAPE, *overrides]) == 0


def test_plan_fit_exits_2_with_the_closest_miss_when_nothing_fits(capsys, monkeypatch):
  """The command's wiring with a compiler whose plans never fit (every policy is tried: no
  real compiles here)."""
  require("tpu")
  compiler = FakeCompiler(scale_gib=400.0)
  monkeypatch.setattr(plan_cli, "make_plan", lambda cfg, *args, **kwargs: compiler(cfg))
  status = plan_cli.main(["--config", "tiny", "--topology", "v5e:2x2", "--fit", "mesh.data=1",
                          "mesh.fsdp=-1", "data.batch_size=8"])
  out, err = capsys.readouterr()
  assert status == 2
  assert len(out.strip().splitlines()) == 2 + len(compiler.compiled)   # a line per candidate
  # Each policy's fused head at g=1 needs at least 6x the 16 GiB: g=2 cannot fit, not compiled.
  assert compiler.compiled == [(policy, 1, tile) for policy in fit.searched_policies()
                               for tile in (0, 4096)]
  assert err.strip().splitlines()[-1] == (
      "goosejax plan: error: nothing fits with data.batch_size=8 x data.ctx_len=128; closest: "
      "run.remat=save_wkv optimizer.grad_accum=1 run.loss_vocab_tile=4096 needs 200.00 of "
      "16.00 GiB; shard more (mesh.fsdp, mesh.tensor), use more devices, or lower data.batch_size")
