"""The `goosejax` entry point: help, unknown commands, every registered command importable."""
import importlib

import pytest

from goosejax import cli


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name in cli.COMMANDS:
    assert name in out


def test_no_arguments_prints_usage_and_fails(capsys):
  assert cli.main([]) == 2
  assert "usage: goosejax" in capsys.readouterr().out


def test_unknown_command_is_rejected(capsys):
  assert cli.main(["trian"]) == 2
  assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_registered_command_modules_expose_main(name):
  module = importlib.import_module(cli.COMMANDS[name][0])
  assert callable(module.main)
