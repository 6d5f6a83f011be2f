"""Multi-host start-up: `jax.distributed.initialize` with cluster auto-detection.

One process runs per host (per GPU on SLURM GPU clusters, as JAX's SLURM support assumes).
`initialize` must run before anything touches a JAX device:

* explicit: `coordinator_address` ("host:port" of process 0), `num_processes`, `process_id`
  (flags or GOOSEJAX_COORDINATOR_ADDRESS / GOOSEJAX_NUM_PROCESSES / GOOSEJAX_PROCESS_ID);
* auto: on a multi-host TPU slice, a SLURM job step with several tasks, an Open MPI job,
  or with JAX_COORDINATOR_ADDRESS set, JAX's own cluster detection fills everything in;
* otherwise this is one process and nothing is initialised.

`timeout_s` bounds how long processes wait for each other at start-up (slow hosts after a
preemption can need many minutes on large slices). CPU processes exchange data through
gloo, which `initialize` selects itself.
"""
from __future__ import annotations

import dataclasses
import os

import jax

from goosejax.errors import GoosejaxError

ENV_PREFIX = "GOOSEJAX_"
DEFAULT_TIMEOUT_S = 300


class DistributedError(GoosejaxError):
  """Inconsistent multi-process settings; the message names them."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  mode: str = "auto"                      # auto | on | off
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = DEFAULT_TIMEOUT_S


def from_env(settings: DistributedSettings) -> DistributedSettings:
  """Fill unset explicit fields from GOOSEJAX_* environment variables."""
  def env(name: str):
    return os.environ.get(ENV_PREFIX + name) or None
  def as_int(name: str, value):
    if value is None:
      return None
    try:
      return int(value)
    except ValueError:
      raise DistributedError(f"{ENV_PREFIX}{name}={value!r}: expected an integer") from None
  return dataclasses.replace(
      settings,
      coordinator_address=settings.coordinator_address or env("COORDINATOR_ADDRESS"),
      num_processes=settings.num_processes if settings.num_processes is not None
      else as_int("NUM_PROCESSES", env("NUM_PROCESSES")),
      process_id=settings.process_id if settings.process_id is not None
      else as_int("PROCESS_ID", env("PROCESS_ID")))


def detected_cluster() -> str | None:
  """A short name of the multi-process environment we are in, or None."""
  environ = os.environ
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "multi-host TPU"
  if environ.get("SLURM_JOB_ID") and int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1"))) > 1:
    return "SLURM"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  return None


def initialize(settings: DistributedSettings) -> str | None:
  """Start the multi-process runtime if this is a multi-process job; returns how it was
  set up ("explicit", a cluster name) or None for a single process."""
  if settings.mode not in ("auto", "on", "off"):
    raise DistributedError(f"distributed mode {settings.mode!r}: expected auto, on or off")
  settings = from_env(settings)
  explicit = (settings.coordinator_address, settings.num_processes, settings.process_id)
  if settings.mode == "off":
    if any(v is not None for v in explicit):
      raise DistributedError("distributed mode 'off' conflicts with the coordinator/process "
                             "settings given")
    return None
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise DistributedError(
          "multi-process start needs all of --coordinator-address, --num-processes and "
          f"--process-id (or {ENV_PREFIX}* variables); got coordinator_address="
          f"{settings.coordinator_address!r}, num_processes={settings.num_processes!r}, "
          f"process_id={settings.process_id!r}")
    if not 0 <= settings.process_id < settings.num_processes:
      raise DistributedError(f"process id {settings.process_id} is outside 0..{settings.num_processes - 1}")
    how = "explicit"
  else:
    how = detected_cluster()
    if how is None and settings.mode == "auto":
      return None
    how = how or "forced"
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=settings.coordinator_address, num_processes=settings.num_processes,
      process_id=settings.process_id, initialization_timeout=settings.timeout_s)
  return how
