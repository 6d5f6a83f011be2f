"""Rematerialisation: what a block keeps for its backward pass (`run.remat`), by name.

The model tags the tensors a layer may keep with `jax.ad_checkpoint.checkpoint_name`; the
policies below choose among them, and everything not kept is recomputed from what is. The
names are stable (policies and jaxpr tools such as `print_saved_residuals` read them; a
compiled program keeps no trace of them, so `goosejax plan --memory` names a saved buffer by
the code line that made it, e.g. rwkv7.py's `Blocks.__call__` for block_in):

  block_in    the residual stream entering a block, [B, T, C] in the compute dtype
              (goosejax.model.rwkv7.Blocks)
  wkv_out     the WKV operator's output y, [B, T, H, N] in the compute dtype, before ln_x
              (goosejax.model.time_mix.TimeMix)
  wkv_states  the WKV state at every chunk start, [J, B, H, N, N] fp32: the checkpoint the WKV
              backward reads (the custom VJPs of pallas_kernels.wkv7 and goosejax.wkv)

Policies, with the bytes each keeps per layer for B x T tokens at C channels in bf16 (chunk Q,
head size N; measured for the 1.5B, 4 x 4096 tokens per chip, in the README's "Training at
scale": full 64 MiB, save_wkv 256, block 1048):

  none      nothing recomputed: every intermediate of every layer is kept
  full      only each layer's input (the layer scan's carry), 2·B·T·C
  minimal   only block_in: the tensor `full` keeps, so the same program as `full`
  save_wkv  block_in, wkv_out and wkv_states, 2·B·T·C + 2·B·T·C + 4·B·T·C·N/Q: the backward
            recomputes the projections and LoRAs but not the WKV forward kernel
  block     every matmul output (jax's dots_with_no_batch_dims_saveable): the most after none
  offload   block_in moved to pinned host memory after the forward and back for the backward:
            no per-layer activation stays on the device between the passes

`v_first` (layer 0's value, read by every later layer) is made once before the layer scan and
kept once, whatever the policy (goosejax.model.rwkv7.run_stacked). Weights are all-gathered
inside the layer under FSDP; no policy names them, so the backward gathers them again.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

from goosejax.config.schema import Remat
from pallas_kernels.wkv_policy import CHECKPOINT_NAME as WKV_STATES

BLOCK_IN = "block_in"
WKV_OUT = "wkv_out"
NAMES = (BLOCK_IN, WKV_OUT, WKV_STATES)

POLICIES: tuple[str, ...] = Remat.__args__   # the config's list of `run.remat` values


def policy(remat: str):
  """The `jax.checkpoint` policy of `run.remat`; None saves nothing (`full`)."""
  policies = jax.checkpoint_policies
  if remat == "full":
    return None
  if remat == "minimal":
    return policies.save_only_these_names(BLOCK_IN)
  if remat == "save_wkv":
    return policies.save_only_these_names(BLOCK_IN, WKV_OUT, WKV_STATES)
  if remat == "block":
    return policies.dots_with_no_batch_dims_saveable
  if remat == "offload":
    # CPU devices have a pinned_host memory space too (jax 0.10): there it is a host copy.
    return policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_IN],
        offload_src="device", offload_dst="pinned_host")
  raise ValueError(f"remat={remat!r}: expected one of {', '.join(POLICIES)}")


def checkpointed(fn: Callable, remat: str) -> Callable:
  """`fn` (one layer) under `remat`'s policy; `fn` itself for `none`."""
  if remat == "none":
    return fn
  return jax.checkpoint(fn, policy=policy(remat))


def tag(x: jax.Array, name: str) -> jax.Array:
  """`x` named for the policies (the value unchanged); `name` one of NAMES."""
  return checkpoint_name(x, name)
