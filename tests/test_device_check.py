"""benchmarks/device_check.py, the hardware checklist, runs end to end on a CPU with --smoke
(tiny shapes, kernels interpreted), so it is known to work when an accelerator is at hand: every
section gives its rows, none fails, and the table is printed."""
import benchmark_scripts


def _device_check():
  return benchmark_scripts.load("device_check")


def test_smoke_run_passes_every_section(capsys):
  assert _device_check().main(["--smoke", "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  table = out[out.index("device_check  jax"):]
  for row in ("self-check       cpu tpu chunk 16                   status=PASS",
              "auto                               fwd_ms=", "pallas chunk 16 ", "xla chunked ",
              "xla associative ", "token scan ", "auto vs xla chunked", "status=PASS  compile_s=",
              "greedy", "no failed steps"):
    assert row in table, row
  assert "FAIL" not in table and "skipped" not in table
