"""Every config key is described once, in its dataclass field, and docs/configuration.md is
that description as generated now."""
from pathlib import Path

from goosejax.config import EXECUTION_SETTINGS, config_keys
from goosejax.config.text import MARKDOWN_COMMAND, keys_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_every_key_has_a_description():
  undescribed = [key.name for key in config_keys() if len(key.description.split()) < 3]
  assert not undescribed, (f"config keys without a description: {undescribed}; declare them "
                           "with goosejax.config.setting(default, description)")


def test_execution_settings_say_they_may_change_on_resume():
  for key in config_keys():
    if key.name in {f"model.{name}" for name in EXECUTION_SETTINGS}:
      assert "may resume with another value" in key.description, key.name


def test_docs_configuration_md_is_up_to_date():
  assert DOCS.read_text() == keys_markdown(), f"docs/configuration.md is stale: run `{MARKDOWN_COMMAND}`"
  assert MARKDOWN_COMMAND in DOCS.read_text()
  for key in config_keys():
    assert f"| `{key.name}` |" in keys_markdown()
