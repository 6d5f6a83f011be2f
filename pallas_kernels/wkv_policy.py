"""Which chunk sizes the chunked WKV-7 forms take, and the decay range that makes them exact.

The one rule for every form (the XLA forms in goosejax.wkv, both Pallas kernels, config checks).
Kept free of jax so `goosejax.config` can check a config without importing it.

Why these sizes: the chunk math (`chunk_math`) forms decay ratios as products of two factors
centred on half the chunk's decay, each at most e^{|LOG_DECAY_MIN| C / 2} (2.7e8 at C = 64), far
inside fp32; its triangular inverse doubles block sizes, so C is a power of two; Triton and the
TPU tiles need C >= 16. Triton's backward needs more shared memory than a Hopper block has above
C = 32 (see `triton_gpu`).
"""
from __future__ import annotations

# The model's decay scale: w = exp(-DECAY_SCALE * sigmoid(z)). The official runtime's 6-digit
# constant (e^{-1/2} rounded); the model must match that runtime bit for bit, so keep it as is.
DECAY_SCALE = 0.606531
LOG_DECAY_MIN = -DECAY_SCALE  # RWKV-7's log decay lies in [LOG_DECAY_MIN, 0)

CHUNK_SIZES = (16, 32, 64)  # every chunked form: XLA chunked / associative, Pallas TPU
KERNEL_CHUNK_SIZES = {"tpu": CHUNK_SIZES, "triton": (16, 32)}  # per Pallas backend
