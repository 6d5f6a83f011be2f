"""The WKV-7 policy: per platform, what each `impl` runs, at which chunk size, on which dtypes.

One table, `POLICY`, read by the configuration checks (goosejax.config), the dispatch
(goosejax.wkv.dispatch), the plan (goosejax.plan) and the kernels (pallas_kernels.wkv7); `choose`
is the one function that reads it. Kept free of jax so `goosejax.config` can check a config
without importing it.

Why these sizes: the chunk math (`chunk_math`) forms decay ratios as products of two factors
centred on half the chunk's decay, each at most e^{|LOG_DECAY_MIN| Q / 2} (2.7e8 at Q = 64), far
inside fp32; its triangular inverse doubles block sizes, so Q is a power of two; Triton and the
TPU tiles need Q >= 16. Triton's backward needs more shared memory than a Hopper block has above
Q = 32 (see `triton_gpu`).

Why these choices: on CPU the token steps win the forward and the chunked custom VJP the
backward, with Q = 32 the best or within noise of it (measured by benchmarks/wkv.py; figures in
the README's WKV-7 operator section). On TPU and CUDA impl="auto" runs the kernels: Q = 64 fills
the TPU MXU; Triton on Hopper fits 16 and 32, and 16 spilled least in the offline sm_90 compile
(`triton_gpu`). Where no kernel runs, the associative form: every op batched over all chunks,
log depth across them, Q = 64 as FLA's RWKV-7 layer uses under the same decay bound. The
accelerator choices are not yet measured on hardware.
"""
from __future__ import annotations

from typing import NamedTuple

# The model's decay scale: w = exp(-DECAY_SCALE * sigmoid(z)). The official runtime's 6-digit
# constant (e^{-1/2} rounded); the model must match that runtime bit for bit, so keep it as is.
DECAY_SCALE = 0.606531
LOG_DECAY_MIN = -DECAY_SCALE  # RWKV-7's log decay lies in [LOG_DECAY_MIN, 0)

# The `checkpoint_name` every WKV custom VJP gives its chunk-start states (the residual its
# backward reads), so a remat policy can keep them (goosejax.model.remat).
CHECKPOINT_NAME = "wkv_states"

CHUNK_SIZES = (16, 32, 64)  # every chunked form takes these; a kernel may take fewer
# What the kernels read (their state and math are fp32): float64 never goes to a kernel.
KERNEL_INPUT_DTYPES = ("float32", "bfloat16", "float16")
# impl="auto" runs the token scan for 1 < T <= this (or the call's chunk size): its per-token
# states are then no more than one chunk's.
AUTO_TOKEN_SCAN_MAX = 32


class Kernel(NamedTuple):
  """A Pallas kernel as `pallas_kernels.wkv7_pallas` runs it."""
  backend: str                  # "tpu" (Mosaic) or "triton"
  chunk_sizes: tuple[int, ...]  # the chunk sizes it accepts
  chunk_size: int               # for a call that names none
  interpret: bool = False       # in the Pallas interpreter (no compiler for it on the platform)


class Form(NamedTuple):
  """One way to run WKV-7 over T > 1 tokens."""
  impl: str                     # "pallas", "chunked" (sequential scan) or "associative"
  chunk_size: int
  intra: str = "matmul"         # "chunked" only: a chunk's forward by "matmul" or "recurrent" steps
  kernel: Kernel | None = None  # "pallas" only


class Platform(NamedTuple):
  """A row of the policy: what runs on one platform."""
  auto: Form                # impl="auto" beyond AUTO_TOKEN_SCAN_MAX tokens
  kernel: Kernel            # impl="pallas"
  xla: Form                 # where the kernel may not run: float64, a failed self-check
  defaults: dict[str, int]  # chunk size of impl="chunked" / "associative" called without one


MOSAIC = Kernel("tpu", CHUNK_SIZES, 16)
TRITON = Kernel("triton", (16, 32), 16)
INTERPRETED = MOSAIC._replace(interpret=True)  # the TPU kernel body, run on any host
_XLA_DEFAULTS = {"chunked": 32, "associative": 64}

# Keys are lax.platform_dependent's platform names; "default" is every other platform (ROCm, ...).
POLICY: dict[str, Platform] = {
    "cpu": Platform(auto=Form("chunked", 32, "recurrent"), kernel=INTERPRETED,
                    xla=Form("chunked", 32, "recurrent"), defaults=_XLA_DEFAULTS),
    "tpu": Platform(auto=Form("pallas", 64, kernel=MOSAIC), kernel=MOSAIC,
                    xla=Form("associative", 64), defaults=_XLA_DEFAULTS),
    "cuda": Platform(auto=Form("pallas", 16, kernel=TRITON), kernel=TRITON,
                     xla=Form("associative", 64), defaults=_XLA_DEFAULTS),
    "default": Platform(auto=Form("associative", 64), kernel=INTERPRETED,
                        xla=Form("associative", 64), defaults=_XLA_DEFAULTS),
}
# The compiled kernels by wkv7_pallas backend.
KERNELS = {row.kernel.backend: row.kernel for row in POLICY.values() if not row.kernel.interpret}


def platform_row(platform: str) -> Platform:
  return POLICY.get(platform, POLICY["default"])


def choose(platform: str, impl: str, chunk_size: int | None = None, *, dtype: str = "float32",
           split: bool = False, kernels: bool = True) -> Form:
  """What `impl` ("auto", "pallas", "chunked", "associative") runs for T > 1 on `platform`.

  chunk_size: the one asked for (None: the form's own). A kernel that does not take it runs
  another, which `substitution` names: impl="auto" its own choice, impl="pallas" the kernel's
  largest. dtype: the compute dtype's name; float64 runs the platform's XLA form, and so does
  kernels=False (the kernel failed its self-check). split: T is split over devices, where
  every XLA form is the sequence-parallel associative one."""
  row = platform_row(platform)
  if impl == "auto":
    form = row.auto
    if form.kernel is None:
      form = form._replace(chunk_size=chunk_size or form.chunk_size)
    elif chunk_size in form.kernel.chunk_sizes:
      form = form._replace(chunk_size=chunk_size)
  elif impl == "pallas":
    size = chunk_size or row.kernel.chunk_size
    if size not in row.kernel.chunk_sizes:
      size = max(row.kernel.chunk_sizes)
    form = Form("pallas", size, kernel=row.kernel)
  else:
    form = Form(impl, chunk_size or row.defaults[impl])
  if form.kernel is not None and (dtype not in KERNEL_INPUT_DTYPES or not kernels):
    form = row.xla._replace(chunk_size=chunk_size or row.xla.chunk_size)
  if split and form.kernel is None:
    form = Form("associative", chunk_size or row.defaults["associative"])
  return form


def substitution(platform: str, impl: str, chunk_size: int | None) -> str:
  """'' when `platform` runs `impl` at `chunk_size` as asked; else one line saying what runs."""
  form = choose(platform, impl, chunk_size)
  if chunk_size is None or form.chunk_size == chunk_size:
    return ""
  return (f"wkv_chunk_size={chunk_size} is not one the {platform} kernel takes "
          f"{form.kernel.chunk_sizes}: impl={impl} runs it at {form.chunk_size}")
