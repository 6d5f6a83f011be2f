"""`wkv7`: the single entry point of the WKV-7 operator.

What runs where is the policy table `pallas_kernels.wkv_policy` (per platform: the form of each
`impl`, its chunk size, the dtypes the kernels take). `wkv7` asks it for every platform and hands
the answers to one `lax.platform_dependent`, which keeps the one for the platform being compiled
for (not JAX's default backend, so compiling for a TPU slice from a CPU host gets Mosaic). A
kernel is handed over as the library function itself (`functools.partial` of `wkv7_pallas`,
under `shard_map` on a mesh), so a traceback from a kernel is short.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import pallas_kernels
from goosejax import sharding
from goosejax.errors import GoosejaxError
from goosejax.sharding import span_mesh
from goosejax.wkv import self_check
from goosejax.wkv.chunked import wkv7_chunked
from goosejax.wkv.reference import compute_dtype, wkv7_reference
from goosejax.wkv.sequence_parallel import wkv7_sequence_parallel, wkv7_sequence_parallel_kernel
from goosejax.wkv.single_token import wkv7_single_token
from pallas_kernels.wkv_policy import (AUTO_TOKEN_SCAN_MAX, CHUNK_SIZES, POLICY, Form, choose,
                                       substitution)

IMPLEMENTATIONS = ("auto", "reference", "chunked", "associative", "pallas")


class WKVInputError(GoosejaxError):
  """Inputs of the wrong shape or an unknown implementation / chunk size."""


def _check_inputs(r, log_w, k, v, a, b, state, reset, impl, chunk_size):
  if impl not in IMPLEMENTATIONS:
    raise WKVInputError(f"wkv7: unknown impl {impl!r}; expected one of {IMPLEMENTATIONS}")
  if chunk_size is not None and chunk_size not in CHUNK_SIZES:
    raise WKVInputError(f"wkv7: chunk_size={chunk_size!r}; expected None or one of {CHUNK_SIZES}")
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


def auto_choice(platform: str | None = None) -> Form:
  """What impl="auto" runs beyond one chunk on `platform` (default: this process's devices):
  the Pallas kernels on TPU and CUDA (per device under a multi-device mesh), else an XLA form."""
  return choose(platform or self_check.local_platform() or jax.default_backend(), "auto")


def wkv7(r, log_w, k, v, a, b, state=None, *, reset=None, impl="auto", chunk_size=None,
         kernel_checks: self_check.KernelChecks | None = None):
  """WKV-7 over a sequence: returns (y [B,T,H,N] in r's dtype, final state [B,H,N,N] in fp32).

  r, k, v, a, b: [B,T,H,N] (a = -kappa_hat, b = kappa_hat * iclr, k the replacement key);
  log_w: [B,T,H,N] log decay in [LOG_DECAY_MIN, 0) (pallas_kernels.wkv_policy); state: [B,H,N,N] value x key, None = zeros;
  reset: [B,T] bool, True where the state is zeroed before that token.
  impl: "reference" (token scan), "chunked" (chunks in a sequential scan), "associative"
  (chunks combined by associative scan), "pallas" (the Pallas kernels; interpret mode on CPU),
  "auto" (the Pallas kernels on TPU / CUDA and the measured XLA form on CPU). Every impl but
  "reference" runs T == 1 as one fused recurrent step (`goosejax.wkv.single_token`), and
  "auto" runs the token scan up to one chunk. What runs where: `pallas_kernels.wkv_policy`.
  chunk_size: 16, 32 or 64 (None: each form's default); a kernel that does not take it runs
  another (`wkv_policy.substitution` names it; start-up lines and the plan say so).
  Under an ambient mesh that splits T over its `sequence` axis (goosejax.sharding),
  "chunked" and "associative" run the sequence-parallel associative form (XLA), "pallas" the
  kernels on each span, "auto" the kernels on TPU / CUDA and the XLA form elsewhere.
  Everything is computed in fp32 (float64 when an input is float64 under x64; float64 never
  goes to a kernel).
  kernel_checks: the kernels' self-check outcomes (goosejax.wkv.self_check); None: those of
  the enclosing `self_check.use` block. A compiled kernel whose check failed on this process's
  devices is replaced by the platform's XLA form; one with no outcome is checked now.
  """
  _check_inputs(r, log_w, k, v, a, b, state, reset, impl, chunk_size)
  dtype = compute_dtype(r, log_w, k, v, a, b, state)
  B, T, H, N = r.shape
  state = jnp.zeros((B, H, N, N), dtype) if state is None else state.astype(dtype)
  if impl == "reference":
    return wkv7_reference(r, log_w, k, v, a, b, state, reset=reset)
  if T == 1:  # one token: the fused single step (goosejax.wkv.single_token), whatever the sequence form
    return wkv7_single_token(r, log_w, k, v, a, b, state, reset, dtype)
  split_mesh = span_mesh(T)
  if impl == "auto" and split_mesh is None and T <= (chunk_size or AUTO_TOKEN_SCAN_MAX):
    return wkv7_reference(r, log_w, k, v, a, b, state, reset=reset)
  branches = _branches(impl, chunk_size, dtype, r.shape, reset is not None, split_mesh,
                       kernel_checks)
  default = branches.pop("default")
  if not branches:  # the same form on every platform
    return default(r, log_w, k, v, a, b, state, reset)
  return jax.lax.platform_dependent(r, log_w, k, v, a, b, state, reset, default=default, **branches)


def _branches(impl, chunk_size, dtype, shape, has_reset, split_mesh,
              kernel_checks) -> dict[str, Callable]:
  """The kernel table: each platform of the policy ("default": every other) mapped to what it
  runs, (r, log_w, k, v, a, b, state, reset) -> (y, final state); one callable per distinct
  form, and the platforms that run the default's left out."""
  by_form, branches = {}, {}
  for platform in POLICY:
    form = _form(platform, impl, chunk_size, dtype, split_mesh is not None, kernel_checks)
    if form not in by_form:
      by_form[form] = _runner(form, dtype, shape, has_reset, split_mesh)
    branches[platform] = by_form[form]
  default = branches["default"]
  return {platform: run for platform, run in branches.items()
          if platform == "default" or run is not default}


def _form(platform, impl, chunk_size, dtype, split: bool, kernel_checks=None) -> Form:
  """The policy's choice, with the platform's XLA form where its compiled kernel failed the
  self-check on this process's devices (goosejax.wkv.self_check)."""
  dtype = jnp.dtype(dtype).name
  form = choose(platform, impl, chunk_size, dtype=dtype, split=split)
  kernel = form.kernel
  if (kernel and not kernel.interpret
      and not self_check.kernels_usable(platform, form.chunk_size, kernel_checks)):
    return choose(platform, impl, chunk_size, dtype=dtype, split=split, kernels=False)
  return form


def _runner(form: Form, dtype, shape, has_reset, split_mesh) -> Callable:
  """`form` as a callable of (r, log_w, k, v, a, b, state, reset)."""
  if form.kernel is not None:
    kernel = functools.partial(pallas_kernels.wkv7_pallas, chunk_size=form.chunk_size,
                               backend=form.kernel.backend, interpret=form.kernel.interpret)
    if split_mesh is not None:
      return functools.partial(wkv7_sequence_parallel_kernel, kernel, mesh=split_mesh)
    return _per_device(kernel, shape, has_reset)
  if split_mesh is not None:
    return functools.partial(_xla_split, mesh=split_mesh, chunk_size=form.chunk_size, dtype=dtype)
  return functools.partial(_xla_chunked, form=form, dtype=dtype)


def _xla_chunked(r, log_w, k, v, a, b, state, reset, *, form: Form, dtype):
  mode = "associative" if form.impl == "associative" else "sequential"
  y, final_state = wkv7_chunked(r, log_w, k, v, a, b, state, reset=reset, chunk_size=form.chunk_size,
                                mode=mode, intra=form.intra, dtype=dtype)
  return y.astype(r.dtype), final_state


def _xla_split(r, log_w, k, v, a, b, state, reset, *, mesh, chunk_size, dtype):
  y, final_state = wkv7_sequence_parallel(r, log_w, k, v, a, b, state, mesh=mesh, reset=reset,
                                          dtype=dtype, chunk_size=chunk_size)
  return y.astype(r.dtype), final_state


def _per_device(kernel, shape, has_reset):
  """`kernel` run by every device of the ambient multi-device mesh (`jax.set_mesh` /
  `use_abstract_mesh`, as the train step traces) on its own block of batch rows and heads
  (`shard_map` over the mesh axes the logical names "batch" and "heads" map to). The kernels
  are single-device custom calls: without this XLA could only run them on gathered inputs.
  Each row and head is independent, so no communication is needed; a dimension that does not
  divide stays whole, and so does time (a kernel runs whole sequences; split ones take the
  sequence-parallel form)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size <= 1:
    return kernel
  x_spec = sharding.logical_spec(("batch", None, "heads", "head_dim"), shape, mesh)
  state_spec = P(x_spec[0], x_spec[2], None, None)
  reset_spec = P(x_spec[0], None) if has_reset else None
  return jax.shard_map(kernel, mesh=mesh, in_specs=(x_spec,) * 6 + (state_spec, reset_spec),
                       out_specs=(x_spec, state_spec), check_vma=False)


def kernel_chunk_sizes(impl: str, chunk_size: int | None, platform: str | None = None) -> list[int]:
  """The chunk sizes at which `impl` runs a compiled kernel on `platform` (default: this
  process's), for a whole sequence and for spans of a split one: what the self-check covers."""
  platform = platform or self_check.local_platform() or jax.default_backend()
  if impl == "reference":
    return []
  forms = (choose(platform, impl, chunk_size), choose(platform, impl, chunk_size, split=True))
  return list(dict.fromkeys(f.chunk_size for f in forms
                            if f.kernel is not None and not f.kernel.interpret))


def startup_line(impl: str, chunk_size: int | None, spans: int = 1,
                 kernel_checks: self_check.KernelChecks | None = None) -> str:
  """Which WKV implementation `impl` runs on this process's devices, for start-up output, with
  the chunk size a kernel runs when it is not the one asked for; with `spans` > 1
  (mesh.sequence), also what runs each span of a split sequence. On a TPU or CUDA device the
  kernels' self-check outcomes come from `kernel_checks`, else from a check run now."""
  kernel_checks = self_check.checks_for(kernel_chunk_sizes(impl, chunk_size), kernel_checks)
  platform = self_check.local_platform() or jax.default_backend()
  form = None if impl == "reference" else choose(platform, impl, chunk_size)
  kernel = None if form is None else form.kernel
  line = self_check.describe_wkv(impl, form.chunk_size if form else None, kernel_checks)
  if kernel is not None:
    note = substitution(platform, impl, chunk_size)
    line += f"; {note}" if note else ""
  if spans > 1:
    kernels = kernel is not None and (
        kernel.interpret or self_check.kernels_usable(platform, form.chunk_size, kernel_checks))
    form_text = ("the kernel (one call over doubled rows: goosejax.wkv.sequence_parallel)"
                 if kernels else "the XLA associative form")
    line += f"; each of the {spans} spans of a split sequence runs {form_text}"
  return line
