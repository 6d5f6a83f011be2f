"""One training and scoring function for every model of the expressivity experiments.

RWKV-7 and the Transformer baseline go through the same code: the project's AdamW recipe
(goosejax.train.recipe.make_optimizer with an OptimizerConfig: its parameter groups, warmup
and cosine schedule, clipping; L2Wrap when the config asks for it), the same masked
cross-entropy, the same batches in the same order. Several tasks of one shape (e.g. the four
groups' word problems) train side by side under `jax.vmap`, one independent model per task
from the same initial parameters, so a grid cell compiles once.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from goosejax.config import OptimizerConfig
from goosejax.train import recipe

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Budget:
  """What every model of a comparison gets: updates, batch size and the optimizer settings."""
  steps: int
  batch_size: int
  optimizer: OptimizerConfig


@dataclasses.dataclass(frozen=True)
class TrainedModels:
  graphdef: nnx.GraphDef
  params_G: recipe.Params      # one model per task, stacked on a leading [G] axis
  final_loss_G: np.ndarray     # mean loss of the last 10% of steps, per task


def masked_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                         loss_mask_BT: jax.Array) -> jax.Array:
  """Mean fp32 cross-entropy over the positions `loss_mask_BT` marks."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
  nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - target_logit_BT
  return jnp.sum(nll_BT * loss_mask_BT) / jnp.maximum(jnp.sum(loss_mask_BT), 1)


def _batches(sources: Sequence, batch_size: int) -> Callable[[int], Batch]:
  """Batch `i` of every source, stacked [G, B, ...]: examples i*B .. (i+1)*B - 1 of each."""
  datasets = [grain.MapDataset.source(s).batch(batch_size, drop_remainder=True) for s in sources]

  def batch(i: int) -> Batch:
    parts = [dataset[i] for dataset in datasets]
    return {key: np.stack([part[key] for part in parts]) for key in parts[0]}
  return batch


def train(model: nnx.Module, sources: Sequence, budget: Budget,
          log: Callable[[str], None] | None = None, log_every: int = 100) -> TrainedModels:
  """Train one copy of `model` per source for `budget.steps` updates, all in lockstep.

  Each source needs at least steps * batch_size examples; step i reads batch i. `log`, when
  given, receives the losses every `log_every` steps.
  """
  for source in sources:
    if len(source) < budget.steps * budget.batch_size:
      raise ValueError(f"{type(source).__name__} has {len(source)} examples; "
                       f"{budget.steps} steps of {budget.batch_size} need more")
  graphdef, params = recipe.split_params(model)
  tx = recipe.make_optimizer(budget.optimizer, budget.steps, list(params))
  use_l2wrap = budget.optimizer.l2wrap

  def loss_fn(params, batch):
    logits_BTV, _ = recipe.merge_params(graphdef, params)(batch["inputs"])
    loss = masked_cross_entropy(logits_BTV, batch["targets"], batch["loss_mask"])
    return recipe.l2wrap(loss, logits_BTV) if use_l2wrap else loss

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  G = len(sources)
  params_G = jax.tree.map(lambda p: jnp.broadcast_to(p, (G, *p.shape)), params)
  opt_state_G = jax.vmap(tx.init)(params_G)
  step_G = jax.jit(jax.vmap(step), donate_argnums=(0, 1))
  batch = _batches(sources, budget.batch_size)
  losses = []
  for i in range(budget.steps):
    params_G, opt_state_G, loss_G = step_G(params_G, opt_state_G, batch(i))
    losses.append(loss_G)
    if log is not None and (i + 1) % log_every == 0:
      log(f"    step {i + 1}: loss " + " ".join(f"{x:.3f}" for x in np.asarray(loss_G)))
  tail = max(1, budget.steps // 10)
  final_loss_G = np.mean(np.stack(jax.device_get(losses[-tail:])), axis=0)
  return TrainedModels(graphdef, params_G, final_loss_G)


def accuracy_by_position(trained: TrainedModels, sources: Sequence,
                         batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Over every example of each source: (correct [G, T], scored [G, T]) counts of argmax
  predictions at each position, counting only loss-masked positions."""
  graphdef = trained.graphdef

  def counts(params, batch):
    logits_BTV, _ = recipe.merge_params(graphdef, params)(batch["inputs"])
    hit_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["targets"]) & batch["loss_mask"]
    return jnp.sum(hit_BT, axis=0), jnp.sum(batch["loss_mask"], axis=0)

  counts_G = jax.jit(jax.vmap(counts))
  n_batches = min(len(s) for s in sources) // batch_size
  batch = _batches(sources, batch_size)
  correct = scored = 0
  for i in range(n_batches):
    hits_GT, masked_GT = jax.device_get(counts_G(trained.params_G, batch(i)))
    correct, scored = correct + hits_GT.astype(np.int64), scored + masked_GT.astype(np.int64)
  return correct, scored
