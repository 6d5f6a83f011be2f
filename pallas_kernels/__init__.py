"""Pallas WKV-7 kernels: Mosaic TPU and Triton GPU, interpret mode on CPU. See `wkv7_pallas`.

The kernels load on first use, so `pallas_kernels.wkv_policy` (the WKV policy table, jax-free)
can be imported by configuration code without importing jax.
"""
import importlib

_EXPORTS = {"BACKENDS": "wkv7", "PallasWKVError": "wkv7", "platform_callables": "wkv7",
            "wkv7_pallas": "wkv7", "CHUNK_SIZES": "wkv_policy", "POLICY": "wkv_policy"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
  return getattr(importlib.import_module(f"pallas_kernels.{_EXPORTS[name]}"), name)
