"""Pretraining: the RWKV-7 recipe, the training loop, checkpoints and metrics.

    from goosejax.train import train
    result = train(load_config("tiny"), "runs/tiny")      # what `goosejax train` runs

Modules: recipe (optimizer groups, schedule, L2Wrap loss, train/eval steps, sharded state),
loss_head (the head, cross-entropy and L2Wrap fused over vocabulary tiles),
loop (the run: open -> steps -> finish), run_dir (the lock and compatibility checks before a
run), run_checkpoints (the run's Orbax manager), compiled_steps (reusing compiled steps across
runs), metrics (FLOPs/MFU, logs), batches (the data interface), distributed (multi-host
start-up), cli (`goosejax train`).
"""
from goosejax.train.compiled_steps import CompiledSteps
from goosejax.train.loop import NonFiniteLossError, RunResult, train

__all__ = ["CompiledSteps", "NonFiniteLossError", "RunResult", "train"]
