"""`wkv7`: the single entry point of the WKV-7 operator, dispatching on `impl`."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import pallas_kernels
from goosejax import sharding
from goosejax.errors import GoosejaxError
from goosejax.sharding import span_mesh
from goosejax.wkv import self_check
from goosejax.wkv.sequence_parallel import wkv7_sequence_parallel, wkv7_sequence_parallel_kernel
from goosejax.wkv.chunked import wkv7_chunked
from goosejax.wkv.reference import compute_dtype, wkv7_reference
from goosejax.wkv.single_token import wkv7_single_token
from pallas_kernels.wkv_policy import CHUNK_SIZES, KERNEL_CHUNK_SIZES

IMPLEMENTATIONS = ("auto", "reference", "chunked", "associative", "pallas")


class Choice(NamedTuple):
  """What impl="auto" runs for T > chunk_size (T == 1 is always a single recurrent step, and
  1 < T <= chunk_size the token scan)."""
  impl: str          # "chunked" or "associative"
  chunk_size: int
  intra: str         # the sequential forward inside a chunk: "matmul" or "recurrent" (token steps)
  group: int = 1     # chunks per step of the sequential scans


# XLA forms for impl="auto", from benchmarks/wkv.py. cpu: measured on a 2-core AMD EPYC (a
# shared machine): the token steps win the forward, the chunked custom VJP the backward (3-6x
# faster than autodiff through the token scan, 1/20-1/50 of its temporaries), and C = 32 was
# the best or within noise of it. On TPU and CUDA, auto runs the Pallas kernels instead
# (PALLAS_AUTO_CHUNK_SIZES); the gpu / tpu entries here are the XLA forms for impl="auto" on
# other platforms (e.g. ROCm) and for reference. NOT measured (no accelerator here): the
# associative form batches every op over all chunks with log depth across them, C = 64 as
# FLA's RWKV-7 layer uses under the same decay bound.
AUTO_CHOICES = {
    "cpu": Choice("chunked", 32, "recurrent"),
    "gpu": Choice("associative", 64, "matmul"),
    "tpu": Choice("associative", 64, "matmul"),
}
# chunk size of an explicit impl="chunked" / "associative" / "pallas" call without one
DEFAULT_CHUNK_SIZES = {"chunked": 32, "associative": 64, "pallas": 16}
# impl="auto" on TPU and CUDA runs the Pallas kernels (lax.platform_dependent picks at lowering
# time) with these chunk sizes: 64 fills the TPU MXU; Triton on Hopper fits 16 and 32, and 16
# spilled least in the offline sm_90 compile. NOT yet measured on hardware.
PALLAS_AUTO_CHUNK_SIZES = {"tpu": 64, "cuda": 16}
PALLAS_CHUNK_SIZES = {"tpu": KERNEL_CHUNK_SIZES["tpu"], "cuda": KERNEL_CHUNK_SIZES["triton"]}


class WKVInputError(GoosejaxError):
  """Inputs of the wrong shape or an unknown implementation / chunk size."""


def _check_inputs(r, log_w, k, v, a, b, state, reset):
  if r.ndim != 4:
    raise WKVInputError(f"wkv7: r must be [B,T,H,N], got shape {r.shape}")
  for name, x in (("log_w", log_w), ("k", k), ("v", v), ("a", a), ("b", b)):
    if x.shape != r.shape:
      raise WKVInputError(f"wkv7: {name} has shape {x.shape}, expected r's shape {r.shape}")
  B, T, H, N = r.shape
  if state is not None and state.shape != (B, H, N, N):
    raise WKVInputError(f"wkv7: state has shape {state.shape}, expected {(B, H, N, N)}")
  if reset is not None and reset.shape != (B, T):
    raise WKVInputError(f"wkv7: reset has shape {reset.shape}, expected {(B, T)}")


def auto_choice(platform: str | None = None) -> Choice:
  """The XLA form impl="auto" uses beyond one chunk on `platform` (default: JAX's backend);
  on TPU and CUDA auto runs the Pallas kernels instead (per device under a multi-device mesh)."""
  platform = platform or jax.default_backend()
  return AUTO_CHOICES.get(platform, AUTO_CHOICES["gpu"])


def wkv7(r, log_w, k, v, a, b, state=None, *, reset=None, impl="auto", chunk_size=None):
  """WKV-7 over a sequence: returns (y [B,T,H,N] in r's dtype, final state [B,H,N,N] in fp32).

  r, k, v, a, b: [B,T,H,N] (a = -kappa_hat, b = kappa_hat * iclr, k the replacement key);
  log_w: [B,T,H,N] log decay in [-0.606531, 0); state: [B,H,N,N] value x key, None = zeros;
  reset: [B,T] bool, True where the state is zeroed before that token.
  impl: "reference" (token scan), "chunked" (chunks in a sequential scan), "associative"
  (chunks combined by associative scan), "pallas" (the Pallas kernels; interpret mode on CPU),
  "auto" (the Pallas kernels on TPU / CUDA and the measured XLA form on CPU). Every impl but
  "reference" runs T == 1 as one fused recurrent step (`goosejax.wkv.single_token`).
  chunk_size: 16, 32 or 64 (None: each form's default).
  Under an ambient mesh that splits T over its `sequence` axis (goosejax.sharding),
  "chunked" and "associative" run the sequence-parallel associative form (XLA), "pallas" the
  kernels on each span, "auto" the kernels on TPU / CUDA and the XLA form elsewhere.
  Everything is computed in fp32 (float64 when an input is float64 under x64).
  """
  _check_inputs(r, log_w, k, v, a, b, state, reset)
  if impl not in IMPLEMENTATIONS:
    raise WKVInputError(f"wkv7: unknown impl {impl!r}; expected one of {IMPLEMENTATIONS}")
  if chunk_size is not None and chunk_size not in CHUNK_SIZES:
    raise WKVInputError(f"wkv7: chunk_size={chunk_size!r}; expected None or one of {CHUNK_SIZES}")
  dtype = compute_dtype(r, log_w, k, v, a, b, state)
  B, T, H, N = r.shape
  state = jnp.zeros((B, H, N, N), dtype) if state is None else state.astype(dtype)
  if impl == "reference":
    return wkv7_reference(r, log_w, k, v, a, b, state, reset=reset)
  if T == 1:  # one token: the fused single step (goosejax.wkv.single_token), whatever the sequence form
    return wkv7_single_token(r, log_w, k, v, a, b, state, reset, dtype)
  mesh = span_mesh(T)
  if mesh is not None:
    return _sequence_split(r, log_w, k, v, a, b, state, reset, mesh, impl, chunk_size, dtype)
  if impl == "pallas":
    return _pallas(r, log_w, k, v, a, b, state, reset, chunk_size or DEFAULT_CHUNK_SIZES["pallas"])
  if impl == "auto":
    return _auto(r, log_w, k, v, a, b, state, reset, chunk_size, dtype)
  return _xla_chunked(r, log_w, k, v, a, b, state, reset, dtype=dtype, impl=impl,
                      chunk_size=chunk_size or DEFAULT_CHUNK_SIZES[impl])


def _xla_chunked(r, log_w, k, v, a, b, state, reset, *, dtype, impl, chunk_size, intra="matmul",
                 group=1):
  mode = "associative" if impl == "associative" else "sequential"
  y, final_state = wkv7_chunked(r, log_w, k, v, a, b, state, reset=reset, chunk_size=chunk_size,
                                mode=mode, intra=intra, group=group, dtype=dtype)
  return y.astype(r.dtype), final_state


def _ambient_mesh():
  """The multi-device mesh the caller traces under (`jax.set_mesh` / `use_abstract_mesh`, as the
  train step does), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size <= 1 else mesh


def _per_device(kernel, mesh):
  """`kernel` run by every device on its own block of batch rows and heads (`shard_map` over
  the mesh axes the logical names "batch" and "heads" map to). The kernels are single-device
  custom calls: without this XLA could only run them on gathered inputs. Each row and head is
  independent, so no communication is needed; a dimension that does not divide stays whole,
  and so does time (a kernel runs whole sequences; split ones take the sequence-parallel form)."""
  if mesh is None:
    return kernel

  def run(r, log_w, k, v, a, b, state, reset):
    B, T, H, N = r.shape
    x_spec = sharding.logical_spec(("batch", None, "heads", "head_dim"), r.shape, mesh)
    state_spec = P(x_spec[0], x_spec[2], None, None)
    args, specs = [r, log_w, k, v, a, b, state], [x_spec] * 6 + [state_spec]
    if reset is not None:
      args.append(reset)
      specs.append(P(x_spec[0], None))

    def local(*local_args):
      local_reset = local_args[7] if reset is not None else None
      return kernel(*local_args[:7], local_reset)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=(x_spec, state_spec),
                         check_vma=False)(*args)
  return run


def kernel_chunk_size(impl: str, platform: str, chunk_size: int | None) -> int:
  """The chunk size the `platform` kernel runs for `impl` ("auto" or "pallas") and the
  configured chunk size (None: the default of `impl`): that one where the kernel takes it,
  else auto's per-platform choice, or for pallas the kernel's largest (Triton stops at 32)."""
  allowed = PALLAS_CHUNK_SIZES[platform]
  if impl == "pallas":
    size = chunk_size or DEFAULT_CHUNK_SIZES["pallas"]
    return size if size in allowed else max(allowed)
  return chunk_size if chunk_size in allowed else PALLAS_AUTO_CHUNK_SIZES[platform]


def _pallas_kernels(chunk_size: int, mesh) -> dict[str, object]:
  """The compiled kernels of each accelerator platform, per device under `mesh` (the XLA form
  on a platform whose kernel failed its self-check here)."""
  branches = {}
  for platform in PALLAS_CHUNK_SIZES:
    size = kernel_chunk_size("pallas", platform, chunk_size)
    if self_check.kernels_usable(platform, size):
      branches[platform] = _per_device(pallas_kernels.platform_callables(chunk_size=size)[platform], mesh)
    else:  # failed its self-check on this process's devices
      branches[platform] = functools.partial(_xla_chunked, dtype=jnp.float32, impl="chunked",
                                             chunk_size=DEFAULT_CHUNK_SIZES["chunked"])
  return branches


def _sequence_split(r, log_w, k, v, a, b, state, reset, mesh, impl, chunk_size, dtype):
  """T split over `mesh`'s sequence axis (goosejax.wkv.sequence_parallel): the XLA associative
  form, or each span run by the platform's kernel (impl "pallas"; "auto" on TPU and CUDA)."""
  def xla(r, log_w, k, v, a, b, state, reset):
    y, final_state = wkv7_sequence_parallel(
        r, log_w, k, v, a, b, state, mesh=mesh, reset=reset, dtype=dtype,
        chunk_size=chunk_size or DEFAULT_CHUNK_SIZES["associative"])
    return y.astype(r.dtype), final_state

  def by_kernel(kernel):
    def run(r, log_w, k, v, a, b, state, reset):
      return wkv7_sequence_parallel_kernel(kernel, r, log_w, k, v, a, b, state, mesh=mesh,
                                           reset=reset)
    return run

  args = (r, log_w, k, v, a, b, state, reset)
  if impl in ("chunked", "associative") or dtype == jnp.float64:  # the kernels take no float64
    return xla(*args)
  # chosen for the platform being compiled for, like the unsplit kernels
  if impl == "pallas":
    size = chunk_size or DEFAULT_CHUNK_SIZES["pallas"]
    kernels = {p: by_kernel(kernel) for p, kernel in _pallas_kernels(size, None).items()}
    interpreted = by_kernel(functools.partial(_interpreted_kernel, size))
    return jax.lax.platform_dependent(*args, default=interpreted, **kernels)
  kernels = {p: by_kernel(kernel) for p, kernel in _auto_kernels(chunk_size, None).items()}
  return jax.lax.platform_dependent(*args, default=xla, **kernels)


def _interpreted_kernel(chunk_size, r, log_w, k, v, a, b, state, reset):
  """The TPU kernel body in the Pallas interpreter: impl="pallas" where no kernel compiles."""
  return pallas_kernels.wkv7_pallas(r, log_w, k, v, a, b, state, reset=reset, chunk_size=chunk_size,
                                    backend="tpu", interpret=True)


def _pallas(r, log_w, k, v, a, b, state, reset, chunk_size):
  """impl="pallas": Mosaic on TPU and Triton on CUDA, chosen for the platform being compiled
  for (not JAX's default backend, so compiling for a TPU slice from a CPU host gets Mosaic);
  elsewhere the TPU kernel body in the Pallas interpreter."""
  mesh = _ambient_mesh()
  interpreted = functools.partial(_interpreted_kernel, chunk_size)
  return jax.lax.platform_dependent(r, log_w, k, v, a, b, state, reset,
                                    default=_per_device(interpreted, mesh),
                                    **_pallas_kernels(chunk_size, mesh))


def _auto(r, log_w, k, v, a, b, state, reset, chunk_size, dtype):
  """impl="auto" for T > 1: the token scan up to one chunk, and beyond that the
  platform's best form, chosen at lowering time by `lax.platform_dependent`: the Pallas kernels
  on TPU and CUDA, the measured XLA form on CPU (and the XLA GPU choice on other platforms)."""
  T = r.shape[1]
  if T <= (chunk_size or AUTO_CHOICES["cpu"].chunk_size):
    # one chunk or less: the token scan's per-token states are no more than a chunk's
    return wkv7_reference(r, log_w, k, v, a, b, state, reset=reset)

  def xla_branch(platform):
    choice = AUTO_CHOICES[platform]
    def run(*args):
      return _xla_chunked(*args, dtype=dtype, impl=choice.impl,
                          chunk_size=chunk_size or choice.chunk_size, intra=choice.intra,
                          group=choice.group)
    return run

  branches = {"cpu": xla_branch("cpu")}
  if dtype != jnp.float64:  # the kernels take fp32/bf16/fp16; under a mesh each device runs its block
    branches.update(_auto_kernels(chunk_size, _ambient_mesh()))
  return jax.lax.platform_dependent(r, log_w, k, v, a, b, state, reset,
                                    default=xla_branch("gpu"), **branches)


def _auto_kernels(chunk_size: int | None, mesh) -> dict[str, object]:
  """impl="auto"'s kernels, per device under `mesh`, of each platform whose kernel passed its
  self-check here (a platform left out runs auto's XLA form)."""
  kernels = {}
  for platform in PALLAS_AUTO_CHUNK_SIZES:
    size = kernel_chunk_size("auto", platform, chunk_size)
    if self_check.kernels_usable(platform, size):
      kernels[platform] = _per_device(pallas_kernels.platform_callables(chunk_size=size)[platform], mesh)
  return kernels


def startup_line(impl: str, chunk_size: int | None, spans: int = 1) -> str:
  """Which WKV implementation `impl` runs on this process's devices, for start-up output (runs
  the kernel self-check now on a TPU or CUDA device); with `spans` > 1 (mesh.sequence), also
  what runs each span of a split sequence."""
  platform = self_check.local_platform()
  if platform is None:
    line = self_check.describe_wkv(impl, chunk_size or DEFAULT_CHUNK_SIZES["pallas"])
    kernels = impl == "pallas"
  else:
    size = kernel_chunk_size(impl, platform, chunk_size)
    line = self_check.describe_wkv(impl, size)
    kernels = impl in ("auto", "pallas") and self_check.kernels_usable(platform, size)
  if spans > 1:
    form = ("the kernel (one call over doubled rows: goosejax.wkv.sequence_parallel)" if kernels
            else "the XLA associative form")
    line += f"; each of the {spans} spans of a split sequence runs {form}"
  return line
