"""The RWKV-7 training recipe (docs/architecture.md#initialisation-and-optimizer) as pure JAX functions.

* Parameter groups as in RWKV-LM's `configure_optimizers`, declared per parameter in
  goosejax.param_table: `att.w0` at `w0_lr_scale` x lr (2x) without weight decay; decoupled
  weight decay only on the big `.weight` matrices; nothing else decays (LoRAs, vectors, norms).
* AdamW with bias correction, betas (0.9, 0.99), eps 1e-18, global-norm clipping at 1.0.
* Learning rate: warmup from 1% over `warmup_steps`, cosine from lr_init to lr_final over
  the whole run (RWKV-LM's token-based formula; tokens per step are constant here).
* Loss: mean cross-entropy in fp32; L2Wrap adds 1e-4/(B*T) * max_logit to the argmax
  logit's gradient at every position (loss value unchanged). `run.loss_vocab_tile` > 0
  computes both fused with the head over vocabulary tiles (goosejax.train.loss_head).
* Mixed precision: parameters and optimizer state are fp32 master copies; the model casts
  them to `model.dtype` (bf16 for real runs) at use, so gradients arrive in fp32.
* Gradient accumulation: `grad_accum` micro-batches scanned inside one jitted step.

The model is used functionally: split once into a graph definition and a flat
{dotted name: array} parameter dict (the pytree that is jitted, sharded and checkpointed),
merged back inside the step.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from goosejax import sharding
from goosejax.config import Config, ConfigError, OptimizerConfig
from goosejax.model import RWKV7
from goosejax.param_table import BY_NAME, Group
from goosejax.train.loss_head import fused_head_loss

L2WRAP_SCALE = 1e-4

Params = dict[str, jax.Array]
Batch = Mapping[str, jax.Array]


class TrainState(NamedTuple):
  step: jax.Array          # int32 scalar: updates done so far
  params: Params           # fp32 master weights, {dotted name: array}
  opt_state: Any           # optax state over `params`


# ----------------------------------------------------------------------------- optimizer


def param_group(name: str) -> Group:
  """'w0' (2x lr, no decay), 'decay' (weight decay) or 'no_decay', as goosejax.param_table
  declares; a name outside the table (a toy optimizer test's) is plain 'no_decay'."""
  return BY_NAME[name].group if name in BY_NAME else "no_decay"


def learning_rate(step: jax.Array | int, opt: OptimizerConfig, total_steps: int) -> jax.Array:
  """RWKV-LM's schedule at update `step` (0-based): cosine to lr_final, warmup from 1%."""
  step = jnp.asarray(step, jnp.float32)
  warmup = opt.warmup_steps
  final_ratio = opt.lr_final / opt.lr_init if opt.lr_init > 0 else 1.0
  progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
  lr = opt.lr_init * ((1 + final_ratio) / 2 + (1 - final_ratio) / 2 * jnp.cos(math.pi * progress))
  if warmup > 0:
    lr = jnp.where(step < warmup, lr * (0.01 + 0.99 * step / warmup), lr)
  return lr


def _scale_each(scales: Mapping[str, float]) -> optax.GradientTransformation:
  """Multiply each parameter's update by its fixed factor (per-group learning rates)."""
  return optax.stateless(lambda updates, params=None: {
      name: update * scales[name] if scales[name] != 1.0 else update
      for name, update in updates.items()})


def make_optimizer(opt: OptimizerConfig, total_steps: int,
                   names: list[str]) -> optax.GradientTransformation:
  """AdamW over a {name: array} dict with RWKV-7's parameter groups."""
  decay_mask = {name: param_group(name) == "decay" for name in names}
  lr_scales = {name: opt.w0_lr_scale if param_group(name) == "w0" else 1.0 for name in names}
  parts = []
  if opt.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip))
  parts += [
      optax.scale_by_adam(b1=opt.beta1, b2=opt.beta2, eps=opt.eps),
      optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
      _scale_each(lr_scales),
      optax.scale_by_learning_rate(lambda count: learning_rate(count, opt, total_steps)),
  ]
  return optax.chain(*parts)


# ----------------------------------------------------------------------------- loss


@jax.custom_vjp
def l2wrap(loss: jax.Array, logits_BTV: jax.Array) -> jax.Array:
  """Returns `loss`; its backward pass adds L2Wrap's push on each position's top logit."""
  del logits_BTV
  return loss


def _l2wrap_fwd(loss, logits_BTV):
  return loss, logits_BTV


def _l2wrap_bwd(logits_BTV, g):
  B, T, V = logits_BTV.shape
  factor = L2WRAP_SCALE / (B * T)
  top_BT = jnp.argmax(logits_BTV, axis=-1)
  max_BT1 = jnp.max(logits_BTV, axis=-1, keepdims=True)
  is_top_BTV = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, 2) == top_BT[..., None]
  # Scaled by the incoming gradient, as in RWKV-LM's current fused version.
  grad_BTV = jnp.where(is_top_BTV, max_BT1 * (factor * g), 0.0).astype(logits_BTV.dtype)
  return g, grad_BTV


l2wrap.defvjp(_l2wrap_fwd, _l2wrap_bwd)


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Mean token cross-entropy in fp32 (fp64 for fp64 logits: the float64 tests)."""
  logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), -1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT)


# ----------------------------------------------------------------------------- model state


def build_model(cfg: Config, seed: int | None = None) -> RWKV7:
  return RWKV7(cfg.model, rngs=nnx.Rngs(cfg.run.seed if seed is None else seed), remat=cfg.run.remat)


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
  """(graph definition, {dotted name: array}); the model must hold nothing but Params."""
  graphdef, state = nnx.split(model)
  params = {}
  for path, variable in nnx.to_flat_state(state):
    if not isinstance(variable, nnx.Param):
      raise TypeError(f"model variable {'.'.join(map(str, path))} is a {type(variable).__name__}; "
                      "the trainer expects only nnx.Param state")
    params[".".join(map(str, path))] = variable.get_value()
  return graphdef, params


def merge_params(graphdef: nnx.GraphDef, params: Mapping[str, jax.Array]) -> nnx.Module:
  flat = {tuple(name.split(".")): value for name, value in params.items()}
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def check_trainable(cfg: Config) -> None:
  """Config combinations the recipe refuses, with the fix in the message."""
  if cfg.model.param_dtype != "float32":
    raise ConfigError(f"model.param_dtype={cfg.model.param_dtype}: training keeps fp32 master "
                      "weights; set model.param_dtype=float32 (model.dtype=bfloat16 selects bf16 compute)")
  accum = cfg.optimizer.grad_accum
  if cfg.data.batch_size % accum:
    raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                      f"optimizer.grad_accum={accum}")


def abstract_model(cfg: Config) -> tuple[nnx.GraphDef, Params]:
  """Graph definition and parameter shapes without allocating anything."""
  return split_params(nnx.eval_shape(lambda: build_model(cfg)))


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  shapes = {name: leaf.shape for name, leaf in abstract_state.params.items()}
  params = sharding.param_shardings(shapes, mesh)
  return TrainState(sharding.replicated(mesh), params,
                    sharding.follow_params(abstract_state.opt_state, shapes, params, mesh))


def abstract_train_state(cfg: Config, tx: optax.GradientTransformation,
                         mesh: Mesh) -> tuple[TrainState, TrainState]:
  """(state of ShapeDtypeStructs carrying their shardings, the shardings): a restore target."""
  def create() -> TrainState:
    _, params = split_params(build_model(cfg))
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  abstract = jax.eval_shape(create)
  shardings = state_shardings(abstract, mesh)
  with_shardings = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
  return with_shardings, shardings


def init_train_state(cfg: Config, tx: optax.GradientTransformation, mesh: Mesh,
                     params: Params | None = None,
                     init_on_host: bool | None = None) -> tuple[TrainState, TrainState]:
  """Sharded initial state: (state, its shardings). Every array is created already split
  over the mesh (eval_shape + jit with out_shardings), never whole on one device.

  `params` (e.g. converted official weights, host arrays) replaces the random initialisation.
  `init_on_host` (default: when the mesh is CPU devices) runs the random initialisation op
  by op on the host instead of inside the sharded jit; see the comment below.
  """
  def create(given: Params | None) -> TrainState:
    if given is None:
      _, given = split_params(build_model(cfg))
    given = {name: jnp.asarray(value, jnp.float32) for name, value in given.items()}
    return TrainState(jnp.zeros((), jnp.int32), given, tx.init(given))

  abstract = jax.eval_shape(create, params)
  shardings = state_shardings(abstract, mesh)
  if init_on_host is None:
    init_on_host = all(d.platform == "cpu" for d in mesh.devices.flat)
  if params is None and init_on_host:
    # jaxlib's CPU QR (the orthogonal init) hands its batch to the thread pool it runs on;
    # inside one jitted program several QRs run at once and can deadlock that pool (seen on
    # a 2-core machine even with one device). Outside it each draw is its own small program
    # (goosejax.model.init), QRs one after another. CPU devices share host memory anyway,
    # so initialise there and place the result on the mesh.
    _, params = split_params(build_model(cfg))
  if params is not None:
    params = place_on_mesh(params, shardings.params)
  param_in = None if params is None else shardings.params
  state = jax.jit(create, in_shardings=(param_in,), out_shardings=shardings)(params)
  return state, shardings


def place_on_mesh(host: Mapping[str, Any], shardings: Mapping[str, jax.sharding.Sharding]) -> Params:
  """Host arrays (the same on every process) -> global arrays split as `shardings` says."""
  placed = {}
  for name, value in host.items():
    value = np.asarray(value)
    placed[name] = jax.make_array_from_callback(value.shape, shardings[name],
                                                lambda index, v=value: v[index])
  return placed


# ----------------------------------------------------------------------------- steps


def global_norm(tree: Any) -> jax.Array:
  """sqrt of the sum of squares of every element, in fp32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _micro_batches(batch: Batch, accum: int) -> dict[str, jax.Array]:
  """[B, ...] -> [accum, B/accum, ...] taking rows a, a+accum, ...: every device keeps an
  equal share of every micro-batch when rows are split contiguously over devices."""
  def split(x):
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return {key: split(value) for key, value in batch.items()}


def make_loss_fn(graphdef: nnx.GraphDef, mesh: Mesh | None, use_l2wrap: bool,
                 vocab_tile: int = 0) -> Callable[[Params, Batch], jax.Array]:
  """(params, batch) -> mean cross-entropy (+ L2Wrap's gradient). `vocab_tile` > 0 (run.
  loss_vocab_tile): the head fused with the loss over tiles of that many vocabulary columns
  (goosejax.train.loss_head), no [B, T, V] fp32 logits; 0: the model's logits, then the loss."""
  def loss_fn(params: Params, batch: Batch) -> jax.Array:
    model = merge_params(graphdef, params)
    inputs_BT = sharding.constrain(batch["inputs"], sharding.BATCH_AXES, mesh)
    reset_BT = batch.get("reset")
    # The ambient mesh lets model code pin activations by logical name (sharding.constrain).
    with contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      x_BTC, _ = model.hidden_states(inputs_BT, reset_BT=reset_BT)
    if vocab_tile:
      return fused_head_loss(x_BTC, model.head[...], batch["targets"], tile=vocab_tile,
                             l2wrap_scale=L2WRAP_SCALE if use_l2wrap else 0.0, mesh=mesh)
    logits_BTV = sharding.constrain(model.logits(x_BTC), sharding.LOGITS_AXES, mesh)
    loss = cross_entropy(logits_BTV, batch["targets"])
    return l2wrap(loss, logits_BTV) if use_l2wrap else loss
  return loss_fn


def make_grad_fn(graphdef: nnx.GraphDef, cfg: Config,
                 mesh: Mesh | None) -> Callable[[Params, Batch], tuple[jax.Array, Params]]:
  """(params, batch) -> (mean loss, mean gradients) over `grad_accum` micro-batches."""
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, mesh, cfg.optimizer.l2wrap,
                                            cfg.run.loss_vocab_tile))
  accum = cfg.optimizer.grad_accum
  if accum == 1:
    return grad_fn

  def loss_and_grads(params: Params, batch: Batch):
    def one_micro_batch(carry, micro):
      loss_sum, grad_sum = carry
      loss, grads = grad_fn(params, micro)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(one_micro_batch, (jnp.zeros((), jnp.float32), zeros),
                                           _micro_batches(batch, accum))
    return loss_sum / accum, jax.tree.map(lambda g: g / accum, grad_sum)

  return loss_and_grads


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: Config,
                    mesh: Mesh | None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The un-jitted step: (state, global batch) -> (new state, metrics)."""
  loss_and_grads = make_grad_fn(graphdef, cfg, mesh)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    loss, grads = loss_and_grads(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": global_norm(grads),
        "param_norm": global_norm(params),
        "lr": learning_rate(state.step, cfg.optimizer, cfg.run.steps),
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh | None,
                   vocab_tile: int = 0) -> Callable[[Params, Batch], jax.Array]:
  """(params, batch) -> mean cross-entropy (no L2Wrap)."""
  return make_loss_fn(graphdef, mesh, use_l2wrap=False, vocab_tile=vocab_tile)


def jit_train_step(step_fn, shardings: TrainState, mesh: Mesh):
  """jit with the state donated and kept on its shardings; batches split over the batch axes."""
  batch_in = sharding.batch_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(shardings, batch_in),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_fn, shardings: TrainState, mesh: Mesh):
  return jax.jit(eval_fn, in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
