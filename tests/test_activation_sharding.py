"""Activations inside the blocks are pinned by logical name, and the remat policies save what
they claim (on 8 fake CPU devices / one CPU device, compiled)."""
import jax
import jax.extend
import jax.numpy as jnp

from goosejax import sharding
from goosejax.config import MeshConfig, load_config
from goosejax.train import recipe

TINY = ["model.vocab_size=256", "data.ctx_len=64", "data.batch_size=8"]


def batch_shapes(cfg):
  shape = (cfg.data.batch_size, cfg.data.ctx_len)
  return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
          "targets": jax.ShapeDtypeStruct(shape, jnp.int32)}


def constraint_specs(cfg, mesh):
  """Every PartitionSpec the loss pins, read from the traced program (scan bodies included)."""
  graphdef, shapes = recipe.abstract_model(cfg)
  loss_fn = recipe.make_loss_fn(graphdef, mesh, use_l2wrap=False)
  jaxpr = jax.make_jaxpr(loss_fn)(shapes, batch_shapes(cfg))
  specs = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "sharding_constraint":
        specs.append((eqn.invars[0].aval.shape, tuple(eqn.params["sharding"].spec)))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return specs


def test_tensor_parallel_blocks_split_heads_and_ffn_hidden_keep_the_residual_whole():
  cfg = load_config("tiny", TINY)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  specs = constraint_specs(cfg, mesh)
  B, T, C = cfg.data.batch_size, cfg.data.ctx_len, cfg.model.n_embd
  H, N, F = cfg.model.n_head, cfg.model.head_size, cfg.model.ffn_dim
  batch = ("data", "fsdp")
  assert ((B, T, C), (batch, None, None)) in specs                 # the residual stream
  assert ((B, T, H, N), (batch, None, "tensor", None)) in specs     # WKV inputs, by head
  assert ((B, T, F), (batch, None, "tensor")) in specs              # the FFN hidden


def test_without_a_mesh_nothing_is_pinned():
  cfg = load_config("tiny", TINY)
  assert constraint_specs(cfg, None) == []


def temporaries(remat):
  cfg = load_config("tiny", TINY + [f"run.remat={remat}", "model.n_layer=4"])
  graphdef, shapes = recipe.abstract_model(cfg)
  grad = jax.jit(jax.grad(recipe.make_loss_fn(graphdef, None, use_l2wrap=True)))
  return grad.trace(shapes, batch_shapes(cfg)).lower().compile().memory_analysis().temp_size_in_bytes


def test_remat_policies_trade_memory_as_documented():
  """none keeps every layer's activations for the backward; block keeps only the matmul
  outputs (recomputing the elementwise work and the WKV); save_wkv each layer's input, WKV
  output and WKV chunk states; full and minimal only each layer's input (the same program)."""
  none, block, save_wkv, minimal, full = map(
      temporaries, ("none", "block", "save_wkv", "minimal", "full"))
  assert minimal == full < save_wkv < block < none, (none, block, save_wkv, minimal, full)
