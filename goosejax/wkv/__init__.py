"""The WKV-7 operator: one signature, several implementations (see `wkv7`)."""
from goosejax.wkv.chunk_math import (ChunkTerms, apply_affine, chunk_forward, chunk_summary,
                                     chunk_terms, combine_affine)
from goosejax.wkv.chunked import CHUNK_SIZES, wkv7_chunked
from goosejax.wkv.dispatch import IMPLEMENTATIONS, WKVInputError, auto_choice, wkv7
from goosejax.wkv.reference import wkv7_reference, wkv7_step

__all__ = ["CHUNK_SIZES", "IMPLEMENTATIONS", "ChunkTerms", "WKVInputError", "apply_affine",
           "auto_choice", "chunk_forward", "chunk_summary", "chunk_terms", "combine_affine",
           "wkv7", "wkv7_chunked", "wkv7_reference", "wkv7_step"]
