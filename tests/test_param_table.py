"""goosejax.param_table against the model that creates the parameters, RWKV-LM's optimizer
groups, the sharding rules, and itself (names, layer patterns, layouts)."""
import jax
import numpy as np
import pytest
from flax import nnx

from goosejax import sharding
from goosejax.config import ModelConfig
from goosejax.model import RWKV7
from goosejax.model.params import param_dict
from goosejax.param_table import (BY_NAME, PARAMS, Layout, dimension_sizes, layer_major,
                                  parse_hf_key, parse_official_key)

# Every dimension a different size, so a table entry with two dimensions swapped or the wrong
# LoRA rank cannot match by coincidence.
CFG = ModelConfig(vocab_size=97, n_layer=3, n_embd=128, head_size=32, dim_ffn=320,
                  decay_lora=16, iclr_lora=24, value_lora=8, gate_lora=40)


def test_sizes_are_all_different():
  sizes = list(dimension_sizes(CFG).values())
  assert len(set(sizes)) == len(sizes)


def test_the_model_creates_exactly_the_declared_parameters_with_their_shapes():
  abstract = jax.eval_shape(lambda: param_dict(RWKV7(CFG, rngs=nnx.Rngs(0))))
  created = {name: tuple(value.shape) for name, value in abstract.items()}
  declared = {p.name: p.shape(CFG) for p in PARAMS}
  assert sorted(set(created) - set(declared)) == [], "created but not in goosejax.param_table"
  assert sorted(set(declared) - set(created)) == [], "declared but not created by the model"
  wrong = {name: (created[name], declared[name]) for name in created if created[name] != declared[name]}
  assert wrong == {}, "(created, declared) shapes"


def test_decay_groups_follow_rwkv_lms_rule():
  # docs/architecture.md#initialisation-and-optimizer: att.w0 alone in the 2x-lr group; weight decay on tensors with >= 2
  # non-singleton dims and ".weight" in their official name; nothing else decays.
  sizes = dimension_sizes(CFG)
  for p in PARAMS:
    per_tensor = [sizes[d] for d in p.dims[1:]] if p.stacked else [sizes[d] for d in p.dims]
    matrix = sum(size > 1 for size in per_tensor) >= 2 and p.official.endswith(".weight")
    expected = "w0" if p.name == "blocks.att.w0" else "decay" if matrix else "no_decay"
    assert p.group == expected, p.name


def test_entries_are_consistent():
  sizes = dimension_sizes(CFG)
  assert len(BY_NAME) == len(PARAMS)
  for kind in ("official", "hf"):
    templates = [getattr(p, kind) for p in PARAMS]
    assert len(set(templates)) == len(templates), f"two parameters share a {kind} name"
  for p in PARAMS:
    assert len(p.dims) == len(p.axes), p.name
    assert set(p.dims) <= set(sizes), p.name
    assert set(p.axes) <= set(sharding.RULES), p.name
    assert p.stacked == (p.axes[0] == "layers") == p.name.startswith("blocks."), p.name
    assert p.stacked == ("{i}" in p.official) == ("{i}" in p.hf), p.name
    assert not p.unused_in_layer0 or p.stacked, p.name
    assert sharding.param_axes(p.name) == p.axes


def test_every_file_name_parses_back_to_its_parameter_and_layer():
  names = [(p, layer) for p, layer in layer_major(CFG.n_layer)]
  assert len(names) == sum(CFG.n_layer if p.stacked else 1 for p in PARAMS)
  for p, layer in names:
    assert parse_official_key(p.official_key(layer)) == (p, layer)
    assert parse_hf_key(p.hf_key(layer)) == (p, layer)
  assert parse_official_key("blocks.1.ln0.weight") is None      # ln0 lives in layer 0 only
  assert parse_hf_key("model.layers.2.attn.g_lora.lora.2.bias") is None
  assert parse_official_key("blocks.0.att.time_decay") is None


@pytest.mark.parametrize("layout, shape, stored", [
    (Layout.SAME, (3, 5), (3, 5)), (Layout.TRANSPOSED, (3, 5), (5, 3)), (Layout.ROW, (7,), (1, 1, 7))])
def test_layouts_round_trip(layout, shape, stored):
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  assert layout.to_file(x).shape == stored
  np.testing.assert_array_equal(layout.from_file(layout.to_file(x)), x)


def test_row_vectors_of_another_shape_are_left_for_the_shape_check():
  assert Layout.ROW.from_file(np.zeros((2, 7))).shape == (2, 7)
  assert Layout.ROW.to_file(np.zeros((2, 7))).shape == (2, 7)
