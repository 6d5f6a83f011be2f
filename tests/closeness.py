"""Tolerances relative to the magnitude compared, so a test holds on any x86-64 CPU.

fp32 rounding differs between CPUs (FMA contraction, AVX-512 vs AVX2 reduction orders); an
absolute tolerance on values far from 1 passes on one machine and fails on the next.
"""
import numpy as np


def relative_error(ours, reference) -> float:
  """max |ours - reference| / max |reference| (0 when both are all zero)."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  assert ours.shape == reference.shape, f"shapes differ: {ours.shape} vs {reference.shape}"
  scale = np.abs(reference).max(initial=0.0)
  error = np.abs(ours - reference).max(initial=0.0)
  return float(error / scale) if scale > 0 else float(error)


def assert_close(ours, reference, tolerance=1e-5, what=""):
  """Fails when the largest error exceeds `tolerance` times the largest reference value."""
  error = relative_error(ours, reference)
  assert error <= tolerance, f"{what}: relative error {error:.2e} > {tolerance:.0e}"
