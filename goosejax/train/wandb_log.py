"""`run.wandb_project`: the run's scalars and resolved config in Weights & Biases.

Process 0 opens one W&B run per run directory: its id is kept in RUN_DIR/wandb_run_id, so a
resumed run directory logs to the same W&B run (`resume="allow"`), and W&B's own files go to
RUN_DIR/wandb/. The scalars are metrics.jsonl's, under TensorBoard's names (train/loss,
val/loss, perf/mfu, eval/...), at the training step. W&B refuses steps below the last it
recorded: after a resume from an older checkpoint, the redone steps keep their first values
there (metrics.jsonl and TensorBoard are rewritten).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from goosejax.config import Config, ConfigError

RUN_ID_FILE = "wandb_run_id"


def check_installed(cfg: Config) -> None:
  """Refuse run.wandb_project without the wandb package, before the run does any work."""
  if cfg.run.wandb_project is None:
    return
  try:
    import wandb  # noqa: F401
  except ImportError:
    raise ConfigError(f"run.wandb_project={cfg.run.wandb_project!r}: Weights & Biases is not "
                      "installed; pip install 'goosejax[wandb]' (or wandb)") from None


def open_wandb_run(cfg: Config, run_dir: Path, say: Callable[[str], None]) -> Any:
  """The W&B run of `run_dir` (new, or the one its wandb_run_id names); None without
  run.wandb_project."""
  settings = cfg.run
  if settings.wandb_project is None:
    return None
  check_installed(cfg)
  import wandb
  id_file = Path(run_dir) / RUN_ID_FILE
  run_id = id_file.read_text().strip() if id_file.is_file() else None   # None: W&B picks one
  try:
    run = wandb.init(project=settings.wandb_project, entity=settings.wandb_entity,
                     name=settings.wandb_name or Path(run_dir).resolve().name,
                     tags=list(settings.wandb_tags), mode=settings.wandb_mode, dir=str(run_dir),
                     id=run_id, resume="allow", config=cfg.to_dict())
  except wandb.errors.Error as e:   # no login, no network, a project the entity cannot write
    raise ConfigError(f"run.wandb_project={settings.wandb_project!r}: W&B did not start: "
                      f"{' '.join(str(e).split())} (`wandb login`, or run.wandb_mode=offline)"
                      ) from None
  id_file.write_text(run.id + "\n")
  where = run.url or f"offline, under {Path(run_dir) / 'wandb'} (upload: wandb sync)"
  say(f"W&B run {run.id} in project {settings.wandb_project}: {where}")
  return run
