"""Typed configuration: the schema (`schema`: dataclasses, validation), reading YAML presets and
`section.key=value` overrides (`load`), the resolved YAML and key reference (`text`), the
command-line side shared by every command (`args`) and `goosejax config` (`cli`).

Everything a caller needs is importable from here: `from goosejax.config import load_config`.
"""
from goosejax.config.load import (COMMAND_LINE_SOURCE, DEFAULT_SOURCE, PRESETS_DIR,
                                  ResolvedConfig, config_from_dict, load_config,
                                  model_config_from_dict, parse_overrides, preset_names,
                                  resolve_config, resolve_preset)
from goosejax.config.schema import (EXECUTION_SETTINGS, Config, ConfigError, DataConfig, Key,
                                    MeshConfig, ModelConfig, OptimizerConfig, RunConfig,
                                    config_keys, setting, suggested_lora_ranks)

__all__ = ["COMMAND_LINE_SOURCE", "DEFAULT_SOURCE", "EXECUTION_SETTINGS", "PRESETS_DIR", "Config",
           "ConfigError", "DataConfig", "Key", "MeshConfig", "ModelConfig", "OptimizerConfig",
           "ResolvedConfig", "RunConfig", "config_from_dict", "config_keys", "load_config",
           "model_config_from_dict", "parse_overrides", "preset_names", "resolve_config",
           "resolve_preset", "setting", "suggested_lora_ranks"]
