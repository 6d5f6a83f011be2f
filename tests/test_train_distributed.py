"""Multi-process start-up settings: explicit flags, GOOSEJAX_* variables, cluster detection
(nothing here starts a distributed runtime; tests/test_multihost.py does)."""
import pytest

from goosejax.train import distributed
from goosejax.train.distributed import DistributedError, DistributedSettings

CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                     "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                     "GOOSEJAX_COORDINATOR_ADDRESS", "GOOSEJAX_NUM_PROCESSES", "GOOSEJAX_PROCESS_ID")


@pytest.fixture
def clean_env(monkeypatch):
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_single_process_needs_nothing(clean_env):
  assert distributed.detected_cluster() is None
  assert distributed.initialize(DistributedSettings()) is None
  assert distributed.initialize(DistributedSettings(mode="off")) is None


@pytest.mark.parametrize("variables, name", [
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "4"}, "SLURM"),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "multi-host TPU"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_detection(clean_env, variables, name):
  for key, value in variables.items():
    clean_env.setenv(key, value)
  assert distributed.detected_cluster() == name


def test_one_task_slurm_job_and_one_tpu_host_are_single_process(clean_env):
  clean_env.setenv("SLURM_JOB_ID", "7")
  clean_env.setenv("SLURM_NTASKS", "1")
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert distributed.detected_cluster() is None


def test_explicit_settings_must_be_complete_and_consistent(clean_env):
  with pytest.raises(DistributedError, match="needs all of"):
    distributed.initialize(DistributedSettings(coordinator_address="h:1", num_processes=2))
  with pytest.raises(DistributedError, match="outside 0..1"):
    distributed.initialize(DistributedSettings(coordinator_address="h:1", num_processes=2, process_id=2))
  with pytest.raises(DistributedError, match="conflicts"):
    distributed.initialize(DistributedSettings(mode="off", process_id=0))
  with pytest.raises(DistributedError, match="expected auto, on or off"):
    distributed.initialize(DistributedSettings(mode="maybe"))


def test_environment_fills_unset_fields(clean_env):
  clean_env.setenv("GOOSEJAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  clean_env.setenv("GOOSEJAX_NUM_PROCESSES", "4")
  clean_env.setenv("GOOSEJAX_PROCESS_ID", "3")
  settings = distributed.from_env(DistributedSettings(process_id=1))
  assert (settings.coordinator_address, settings.num_processes, settings.process_id) == ("10.0.0.1:1234", 4, 1)
  clean_env.setenv("GOOSEJAX_NUM_PROCESSES", "four")
  with pytest.raises(DistributedError, match="GOOSEJAX_NUM_PROCESSES='four'"):
    distributed.from_env(DistributedSettings())
