"""Pallas WKV-7 kernels: Mosaic TPU and Triton GPU, interpret mode on CPU. See `wkv7_pallas`."""
from pallas_kernels.wkv7 import BACKENDS, CHUNK_SIZES, PallasWKVError, platform_callables, wkv7_pallas

__all__ = ["BACKENDS", "CHUNK_SIZES", "PallasWKVError", "platform_callables", "wkv7_pallas"]
