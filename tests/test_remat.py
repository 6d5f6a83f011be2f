"""`run.remat` policies (goosejax.model.remat): each gives `none`'s loss and gradients, and
keeps for the backward what the module docstring says (read from jax's saved residuals)."""
import contextlib
import functools
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from goosejax.config import load_config
from goosejax.model import remat
from goosejax.train import recipe
from closeness import assert_close
from pallas_kernels import wkv_policy

B, T, L = 2, 64, 3
TINY = ["model.vocab_size=256", f"data.ctx_len={T}", f"data.batch_size={B}", f"model.n_layer={L}"]
POLICIES = [policy for policy in remat.POLICIES if policy != "none"]


def config(policy):
  return load_config("tiny", TINY + [f"run.remat={policy}"])


@functools.cache
def inputs():
  """Parameters with every weight random (the init's zero LoRA matrices would hide their
  gradients) and a batch with document starts inside the rows."""
  rng = np.random.default_rng(0)
  _, params = recipe.split_params(recipe.build_model(config("none")))
  params = {name: value + 0.05 * jnp.asarray(rng.standard_normal(value.shape), value.dtype)
            for name, value in params.items()}
  reset_BT = np.zeros((B, T), bool)
  reset_BT[0, 11] = reset_BT[1, 40] = True
  batch = {"inputs": jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32),
           "reset": jnp.asarray(reset_BT)}
  return params, batch


def loss_fn(policy):
  graphdef, _ = recipe.abstract_model(config(policy))
  return recipe.make_loss_fn(graphdef, None, use_l2wrap=True)


@functools.cache
def loss_and_grads(policy):
  return jax.jit(jax.value_and_grad(loss_fn(policy)))(*inputs())


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_gives_the_loss_and_gradients_of_none(policy):
  loss, grads = loss_and_grads(policy)
  reference_loss, reference_grads = loss_and_grads("none")
  assert_close(loss, reference_loss, 1e-6, what=f"{policy} loss")
  # A recomputed forward is fused into the backward and rounds differently: 1.1e-5 seen.
  for name, grad in reference_grads.items():
    assert np.abs(np.asarray(grad)).max() > 0, name   # every gradient is exercised
    assert_close(grads[name], grad, 1e-4, what=f"{policy} d{name}")


def saved(policy) -> list[str]:
  """jax's list of what the loss's backward keeps, one line per residual."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(loss_fn(policy), *inputs())
  return out.getvalue().splitlines()


def shapes(lines, memory="") -> list[tuple[int, ...]]:
  """The shapes of `lines`' residuals in `memory` ('' device, 'host' pinned host)."""
  pattern = rf"\w+{f'<{memory}>' if memory else ''}\[([\d,]*)\]"
  found = [re.match(pattern, line) for line in lines]
  return [tuple(int(d) for d in m[1].split(",") if d) for m in found if m]


def stacked(lines) -> list[str]:
  """Residuals the layer scan keeps per layer."""
  return [line for line in lines if "output of scan" in line]


@pytest.mark.parametrize("policy", ["full", "minimal", "offload"])
def test_lean_policies_keep_one_residual_stream_per_layer_and_v_first_once(policy):
  C = config(policy).model.n_embd
  lines = saved(policy)
  on_host = policy == "offload"
  assert shapes(stacked(lines), "host" if on_host else "") == [(L, B, T, C)], stacked(lines)
  assert shapes(stacked(lines), "" if on_host else "host") == []
  # v_first: layer 0's value projection, kept once outside the scan
  values = [line for line in lines if re.match(rf"f32\[{B},{T},{C}\] output of dot_general", line)]
  assert len(values) == 1, lines


def test_save_wkv_keeps_the_wkv_output_and_chunk_states_per_layer():
  model = config("save_wkv").model
  H, N = model.n_head, model.head_size
  kept = shapes(stacked(saved("save_wkv")))
  assert (L, B, T, model.n_embd) in kept and (L, B, T, H, N) in kept
  J = T // wkv_policy.choose("cpu", model.wkv_impl, model.wkv_chunk_size).chunk_size
  assert (L, J, B, H, N, N) in kept, kept            # the chunk starts of the CPU form
  assert len(kept) > len(shapes(stacked(saved("full"))))


def test_a_policy_that_is_not_listed_is_refused():
  with pytest.raises(ValueError, match="remat='dots'"):
    remat.policy("dots")
