"""The code layout the README's code map describes, kept true: module names that say where they
live, a small top level, kernels that stand alone, and functions short enough to read."""
import ast
import collections
import importlib
import re
from pathlib import Path

import pytest

from goosejax.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = (ROOT / "goosejax", ROOT / "pallas_kernels")
MAX_FUNCTION_LINES = 90
MAX_TOP_LEVEL_MODULES = 6   # goosejax/*.py besides __init__.py


def _modules():
  return [path for package in LIBRARY for path in sorted(package.rglob("*.py"))]


def test_no_two_library_modules_share_a_file_name():
  by_name = collections.defaultdict(list)
  for path in _modules():
    if path.name not in ("cli.py", "__init__.py"):
      by_name[path.name].append(str(path.relative_to(ROOT)))
  assert {name: paths for name, paths in by_name.items() if len(paths) > 1} == {}


def test_the_top_level_stays_small():
  top = sorted(p.name for p in (ROOT / "goosejax").glob("*.py") if p.name != "__init__.py")
  assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_every_command_is_a_package_cli_module():
  for name, (module, _) in COMMANDS.items():
    assert module.startswith("goosejax.") and module.endswith(".cli"), (name, module)
    assert callable(importlib.import_module(module).main), module


def _imported_modules(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


@pytest.mark.parametrize("path", sorted((ROOT / "pallas_kernels").rglob("*.py")), ids=lambda p: p.name)
def test_the_kernels_import_nothing_from_goosejax(path):
  imported = list(_imported_modules(ast.parse(path.read_text())))
  assert [m for m in imported if m.split(".")[0] == "goosejax"] == []


def test_no_function_is_longer_than_the_limit():
  long = []
  for path in _modules():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
  assert long == []


def test_the_readme_code_map_lists_every_module():
  readme = (ROOT / "README.md").read_text()
  code_map = readme[readme.index("## Code map"):]
  listed = set(re.findall(r"`([\w/]+\.py)`", code_map))
  modules = {str(p.relative_to(ROOT)) for p in _modules()
             if p.name != "__init__.py" or p.parent.name == "goosejax"}
  assert sorted(modules - listed) == [] and sorted(p for p in listed - modules
                                                   if p.startswith(("goosejax/", "pallas_kernels/"))) == []
