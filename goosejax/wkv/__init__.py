"""The WKV-7 operator: one signature, several implementations (see `wkv7`).

The chunk math itself (shared with the Pallas kernels) is `pallas_kernels.chunk_math`."""
from goosejax.wkv.chunked import wkv7_chunked
from goosejax.wkv.dispatch import IMPLEMENTATIONS, WKVInputError, auto_choice, wkv7
from goosejax.wkv.reference import wkv7_reference, wkv7_step
from pallas_kernels.wkv_policy import CHUNK_SIZES

__all__ = ["CHUNK_SIZES", "IMPLEMENTATIONS", "WKVInputError", "auto_choice", "wkv7",
           "wkv7_chunked", "wkv7_reference", "wkv7_step"]
