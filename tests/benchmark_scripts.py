"""The scripts of benchmarks/ as modules, for the tests that run their functions."""
import importlib.util
import pathlib
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
  """benchmarks/<name>.py imported as module `name` (registered in sys.modules first: its
  dataclasses look their module up there)."""
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  module = sys.modules[name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
