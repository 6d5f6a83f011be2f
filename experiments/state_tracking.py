"""RWKV-7 against a same-shape causal Transformer on state tracking and associative recall.

  python experiments/state_tracking.py                  # reduced grid (CPU, under an hour)
  python experiments/state_tracking.py --grid full      # the full grid (an accelerator)
  python experiments/state_tracking.py --grid my.yaml --out /tmp/st

Grids are YAML files (experiments/configs/state_tracking_{reduced,full}.yaml). Both models
get the same ModelConfig shape, the same data, optimizer, schedule and step budget through
one training function (experiments/synthetic_training.py).

Word problems (Merrill et al. 2024): for each group, each model and each depth, one model is
trained on words of `train_length` elements; its per-token accuracy at length T is its
accuracy over the first T positions of held-out words (a causal model's accuracy on words of
length T). The table reports, per group, model and length, the fewest layers above 95%.
MQAR: accuracy on held-out sequences against the model's state size (RWKV-7: the WKV state,
L·H·N·N = L·n_embd·head_size numbers; the Transformer's KV cache, 2·L·T·n_embd, is listed
for reference). Writes OUT/state_tracking.md and OUT/state_tracking.png. The whole grid is
checked and OUT written to before anything trains: a bad --grid, grid file or --out is one
line and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from flax import nnx

from goosejax.cli import describe_os_error
from goosejax.config import ConfigError, ModelConfig, OptimizerConfig, config_from_dict
from goosejax.config.schema import MAX_INTEGER_SETTING
from goosejax.data.synthetic import (GROUP_NAMES, GroupWordProblem, MultiQueryAssociativeRecall,
                                     make_group)
from goosejax.errors import GoosejaxError
from goosejax.model import RWKV7
from transformer_baseline import CausalTransformer
from synthetic_training import Budget, accuracy_by_position, train

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "experiments" / "configs"
DOCS = REPO / "docs"
SOLVED = 0.95
EVAL_SEED_OFFSET = 1_000_003     # held-out examples come from another seed stream

MODELS: dict[str, Callable[[ModelConfig, int], nnx.Module]] = {
    "RWKV-7": lambda cfg, seed: RWKV7(cfg, rngs=nnx.Rngs(seed)),
    "Transformer": lambda cfg, seed: CausalTransformer(cfg, rngs=nnx.Rngs(seed)),
}


# ----------------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class WordProblemGrid:
  groups: tuple[str, ...]
  layers: tuple[int, ...]
  n_embd: int
  head_size: int
  train_length: int
  eval_lengths: tuple[int, ...]
  steps: int
  batch_size: int
  eval_examples: int


@dataclasses.dataclass(frozen=True)
class MQARGrid:
  n_layer: int
  shapes: tuple[tuple[int, int], ...]    # (n_embd, head_size) per model size
  num_pairs: int
  num_keys: int
  num_values: int
  steps: int
  batch_size: int
  eval_examples: int


@dataclasses.dataclass(frozen=True)
class Grid:
  source: str                            # the YAML file, relative to the repository if inside it
  seed: int
  optimizer: OptimizerConfig
  word_problems: WordProblemGrid
  mqar: MQARGrid


class GridError(GoosejaxError):
  """A --grid or grid file the experiment cannot run; the message names the file and key."""


GRID_NAMES = ("reduced", "full")


def grid_path(name: str) -> Path:
  """--grid: a committed grid's name or a YAML file."""
  if name in GRID_NAMES:
    return CONFIGS / f"state_tracking_{name}.yaml"
  if name.endswith((".yaml", ".yml")):
    return Path(name)
  raise GridError(f"--grid {name!r}: expected {' or '.join(GRID_NAMES)} or a grid YAML file "
                  "(.yaml, .yml)")


def _read_grid_yaml(path: Path) -> dict[str, Any]:
  """The grid file's top-level mapping; a binary, invalid or empty file is a GridError."""
  try:
    with path.open("rb") as stream:
      tree = yaml.safe_load(stream)
  except yaml.reader.ReaderError as e:
    raise GridError(f"{path}: not a YAML text file ({e.reason} at position {e.position})") from None
  except yaml.YAMLError as e:
    raise GridError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
  except ValueError as e:   # an integer of more digits than Python converts
    raise GridError(f"{path}: a value cannot be read ({str(e).split(':')[0]})") from None
  sections = ["mqar", "optimizer", "seed", "word_problems"]
  if tree is None:
    raise GridError(f"{path}: the grid file is empty; expected the keys {sections}")
  if not isinstance(tree, dict) or set(tree) != set(sections):
    found = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
    raise GridError(f"{path}: expected a mapping with exactly the keys {sections}, got {found}")
  return tree


def _value(value: Any, annotation: Any, where: str) -> Any:
  """`value` checked against a grid field's type: positive ints (at most int32), strings,
  non-empty lists of distinct items, [a, b] pairs; lists become tuples."""
  args = typing.get_args(annotation)
  if annotation is int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_INTEGER_SETTING:
      return value
    raise GridError(f"{where}={value!r}: expected a positive integer (at most {MAX_INTEGER_SETTING})")
  if annotation is str:
    if isinstance(value, str):
      return value
    raise GridError(f"{where}={value!r}: expected a string")
  if not isinstance(value, list) or not value:
    raise GridError(f"{where}={value!r}: expected a non-empty list")
  if args[-1] is Ellipsis:
    items = tuple(_value(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
    if len(set(items)) < len(items):
      raise GridError(f"{where}={value!r}: expected distinct items")
    return items
  if len(value) != len(args):
    raise GridError(f"{where}={value!r}: expected a list of {len(args)}")
  return tuple(_value(item, arg, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))


def _section(path: Path, tree: dict[str, Any], key: str, cls: type) -> Any:
  """Section `key` of the grid as `cls`: exactly its fields, each of its type."""
  values, fields = tree[key], typing.get_type_hints(cls)
  if not isinstance(values, dict) or set(values) != set(fields):
    found = sorted(map(str, values)) if isinstance(values, dict) else repr(values)
    raise GridError(f"{path}: {key}: expected exactly the keys {sorted(fields)}, got {found}")
  return cls(**{name: _value(values[name], annotation, f"{path}: {key}.{name}")
                for name, annotation in fields.items()})


def _check_shape(path: Path, where: str, n_layer: int, n_embd: int, head_size: int) -> None:
  try:
    model_config(1, n_layer, n_embd, head_size).validate()
  except ConfigError as e:
    raise GridError(f"{path}: {where}: {e}") from None


def _check_word_problems(path: Path, wp: WordProblemGrid) -> None:
  unknown = [name for name in wp.groups if name not in GROUP_NAMES]
  if unknown:
    raise GridError(f"{path}: word_problems.groups: unknown {unknown}; known: {list(GROUP_NAMES)}")
  if max(wp.eval_lengths) > wp.train_length:
    raise GridError(f"{path}: word_problems.eval_lengths {list(wp.eval_lengths)} exceed "
                    f"train_length {wp.train_length}")
  for n_layer in wp.layers:
    _check_shape(path, "word_problems", n_layer, wp.n_embd, wp.head_size)


def _check_mqar(path: Path, mq: MQARGrid) -> None:
  if mq.num_pairs > mq.num_keys:
    raise GridError(f"{path}: mqar.num_pairs={mq.num_pairs} needs as many distinct keys, but "
                    f"mqar.num_keys={mq.num_keys}")
  for n_embd, head_size in mq.shapes:
    _check_shape(path, f"mqar.shapes [{n_embd}, {head_size}]", mq.n_layer, n_embd, head_size)


def load_grid(path: Path) -> Grid:
  """The grid in `path`, every setting of both experiments checked before anything trains."""
  tree = _read_grid_yaml(path)
  seed = tree["seed"]
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_INTEGER_SETTING:
    raise GridError(f"{path}: seed={seed!r}: expected an integer from 0 to {MAX_INTEGER_SETTING}")
  try:
    optimizer = config_from_dict({"optimizer": tree["optimizer"]}, str(path)).optimizer
  except ConfigError as e:   # the goosejax loader's checks: unknown keys, types, ranges
    raise GridError(f"{path}: {e}") from None
  wp = _section(path, tree, "word_problems", WordProblemGrid)
  mq = _section(path, tree, "mqar", MQARGrid)
  for key, section in (("word_problems", wp), ("mqar", mq)):
    if section.eval_examples < section.batch_size:
      raise GridError(f"{path}: {key}.eval_examples={section.eval_examples}: expected at least "
                      f"one batch ({key}.batch_size={section.batch_size})")
  _check_word_problems(path, wp)
  _check_mqar(path, mq)
  path = path.resolve()
  source = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
  return Grid(source, seed, optimizer, wp, mq)


def check_writable(directory: Path) -> None:
  """Make `directory` and write a file there now, not after an hour of training."""
  directory.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryFile(dir=directory):
    pass


def model_config(vocab_size: int, n_layer: int, n_embd: int, head_size: int) -> ModelConfig:
  """The shape both architectures get; everything else stays at the project's defaults."""
  return ModelConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, head_size=head_size)


def _log(message: str) -> None:
  print(message, flush=True)


# ----------------------------------------------------------------------------- experiments


@dataclasses.dataclass(frozen=True)
class WordProblemResult:
  group: str
  model: str
  n_layer: int
  accuracy_by_length: dict[int, float]
  final_loss: float


def run_word_problems(grid: Grid) -> list[WordProblemResult]:
  """Every group trains side by side (vmap) in one model per (architecture, depth); the
  vocabulary is the largest group's order, smaller groups never use the extra ids."""
  wp = grid.word_problems
  groups = [make_group(name) for name in wp.groups]
  vocab_size = max(g.order for g in groups)
  budget = Budget(wp.steps, wp.batch_size, grid.optimizer)
  train_sources = [GroupWordProblem(g, wp.train_length, wp.steps * wp.batch_size, grid.seed)
                   for g in groups]
  eval_sources = [GroupWordProblem(g, wp.train_length, wp.eval_examples, grid.seed + EVAL_SEED_OFFSET)
                  for g in groups]
  results = []
  for model_name, build in MODELS.items():
    for n_layer in wp.layers:
      start = time.perf_counter()
      model = build(model_config(vocab_size, n_layer, wp.n_embd, wp.head_size), grid.seed)
      trained = train(model, train_sources, budget, log=_log)
      correct_GT, scored_GT = accuracy_by_position(trained, eval_sources, wp.batch_size)
      for g, group in enumerate(groups):
        accuracy = {T: float(correct_GT[g, :T].sum() / scored_GT[g, :T].sum()) for T in wp.eval_lengths}
        results.append(WordProblemResult(group.name, model_name, n_layer, accuracy,
                                         float(trained.final_loss_G[g])))
        _log(f"  {group.name:6s} {model_name:11s} L={n_layer}  " +
             "  ".join(f"T={T}: {a:.3f}" for T, a in accuracy.items()))
      _log(f"word problems {model_name} L={n_layer}: {time.perf_counter() - start:.0f}s")
  return results


@dataclasses.dataclass(frozen=True)
class MQARResult:
  model: str
  n_embd: int
  head_size: int
  state_size: int
  accuracy: float


def run_mqar(grid: Grid) -> list[MQARResult]:
  mq = grid.mqar
  make = lambda n, seed: MultiQueryAssociativeRecall(mq.num_pairs, mq.num_keys, mq.num_values, n, seed)
  train_source = make(mq.steps * mq.batch_size, grid.seed)
  eval_source = make(mq.eval_examples, grid.seed + EVAL_SEED_OFFSET)
  budget = Budget(mq.steps, mq.batch_size, grid.optimizer)
  seq_len = train_source.seq_len
  results = []
  for model_name, build in MODELS.items():
    for n_embd, head_size in mq.shapes:
      start = time.perf_counter()
      model = build(model_config(train_source.vocab_size, mq.n_layer, n_embd, head_size), grid.seed)
      trained = train(model, [train_source], budget, log=_log)
      correct_GT, scored_GT = accuracy_by_position(trained, [eval_source], mq.batch_size)
      state_size = (mq.n_layer * n_embd * head_size if model_name == "RWKV-7"
                    else 2 * mq.n_layer * seq_len * n_embd)
      accuracy = float(correct_GT.sum() / scored_GT.sum())
      results.append(MQARResult(model_name, n_embd, head_size, state_size, accuracy))
      _log(f"mqar {model_name} C={n_embd} N={head_size} state={state_size}: {accuracy:.3f} "
           f"({time.perf_counter() - start:.0f}s)")
  return results


# ----------------------------------------------------------------------------- report


def fewest_layers(results: list[WordProblemResult], group: str, model: str, length: int) -> int | None:
  solved = [r.n_layer for r in results
            if r.group == group and r.model == model and r.accuracy_by_length[length] > SOLVED]
  return min(solved) if solved else None


def _percent(x: float) -> str:
  """Accuracies to 0.1%: the table is what a re-run must reproduce."""
  return f"{100 * x:.1f}"


def markdown(grid: Grid, command: str, words: list[WordProblemResult], recall: list[MQARResult]) -> str:
  wp, mq, opt = grid.word_problems, grid.mqar, grid.optimizer
  lengths = wp.eval_lengths
  max_layers = max(wp.layers)
  lines = [
      "# State tracking and associative recall: RWKV-7 vs Transformer",
      "",
      f"Generated by `{command}` from the grid {grid.source}. Seed {grid.seed}; accuracies are "
      "rounded to 0.1% and a re-run of the same grid reproduces this file.",
      "",
      f"Both models: the same ModelConfig shape, AdamW from goosejax.train.recipe.make_optimizer "
      f"(lr {opt.lr_init:g} -> {opt.lr_final:g} cosine, {opt.warmup_steps} warmup steps, "
      f"weight decay {opt.weight_decay:g}, clip {opt.grad_clip:g}, L2Wrap {'on' if opt.l2wrap else 'off'}), "
      "the same batches in the same order, the same number of steps. The Transformer is pre-norm "
      "with rotary positions, softmax attention and a 4x GELU MLP (experiments/transformer_baseline.py).",
      "",
      "## Group word problems",
      "",
      f"Width {wp.n_embd}, head size {wp.head_size}; trained on words of {wp.train_length} "
      f"elements for {wp.steps} steps of {wp.batch_size}; accuracy at length T is the per-token "
      f"accuracy over the first T positions of {wp.eval_examples} held-out words.",
      "",
      f"### Fewest layers reaching > {SOLVED:.0%} per-token accuracy "
      f"(layers tried: {', '.join(map(str, wp.layers))}; '>{max_layers}': none did)",
      "",
      "| group | model | " + " | ".join(f"T={T}" for T in lengths) + " |",
      "|---|---|" + "---|" * len(lengths),
  ]
  for group in wp.groups:
    for model in MODELS:
      cells = [fewest_layers(words, group, model, T) for T in lengths]
      lines.append(f"| {group} | {model} | " +
                   " | ".join(str(c) if c is not None else f">{max_layers}" for c in cells) + " |")
  lines += [
      "",
      "### Per-token accuracy (%)",
      "",
      "| group | model | layers | " + " | ".join(f"T={T}" for T in lengths) + " | final train loss |",
      "|---|---|---|" + "---|" * (len(lengths) + 1),
  ]
  for r in sorted(words, key=lambda r: (wp.groups.index(r.group), list(MODELS).index(r.model), r.n_layer)):
    lines.append(f"| {r.group} | {r.model} | {r.n_layer} | " +
                 " | ".join(_percent(r.accuracy_by_length[T]) for T in lengths) +
                 f" | {r.final_loss:.2f} |")
  lines += [
      "",
      "## Multi-query associative recall",
      "",
      f"{mq.num_pairs} key-value pairs (keys from {mq.num_keys} ids, values from {mq.num_values}), "
      f"then every key queried once; {mq.n_layer} layers, {mq.steps} steps of {mq.batch_size}; "
      f"accuracy over the query answers of {mq.eval_examples} held-out sequences. State: "
      "RWKV-7's WKV state L·H·N·N; for the Transformer its KV cache at the full length, 2·L·T·C.",
      "",
      "| model | width | head size | state (numbers) | accuracy (%) |",
      "|---|---|---|---|---|",
  ]
  for r in recall:
    lines.append(f"| {r.model} | {r.n_embd} | {r.head_size} | {r.state_size} | {_percent(r.accuracy)} |")
  return "\n".join(lines) + "\n"


def plot(grid: Grid, words: list[WordProblemResult], recall: list[MQARResult], path: Path) -> None:
  """Top row: per-token accuracy against length for every model and depth, then MQAR accuracy
  against state size. Bottom row: the fewest layers above 95% (the table's summary)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  wp = grid.word_problems
  lengths = wp.eval_lengths
  colors = {"RWKV-7": "tab:green", "Transformer": "tab:blue"}
  markers = {"RWKV-7": "o", "Transformer": "s"}
  dashes = ["-", "--", ":", "-."]
  unsolved = max(wp.layers) + 1
  columns = len(wp.groups) + 1
  fig, axes = plt.subplots(2, columns, figsize=(3.6 * columns, 6.6), squeeze=False)
  for column, group in enumerate(wp.groups):
    ax = axes[0, column]
    for model in MODELS:
      for n_layer, dash in zip(wp.layers, dashes):
        [r] = [r for r in words if (r.group, r.model, r.n_layer) == (group, model, n_layer)]
        ax.plot(lengths, [100 * r.accuracy_by_length[T] for T in lengths], dash,
                color=colors[model], marker=markers[model], label=f"{model}, L={n_layer}")
    ax.axhline(100 * SOLVED, color="gray", lw=0.8, ls=":")
    ax.set_ylim(0, 102)
    ax.set_title(f"{group} word problem")
    ax.set_ylabel("per-token accuracy (%)")
    ax = axes[1, column]
    for offset, model in zip((-0.06, 0.06), MODELS):
      layers = [fewest_layers(words, group, model, T) or unsolved for T in lengths]
      ax.plot(lengths, np.array(layers) + offset, color=colors[model], marker=markers[model], label=model)
    ax.set_yticks(range(1, unsolved + 1), [*map(str, range(1, unsolved)), f">{unsolved - 1}"])
    ax.set_ylim(0.5, unsolved + 0.5)
    ax.set_ylabel(f"fewest layers > {SOLVED:.0%}")
    for ax in axes[:, column]:
      ax.set_xscale("log", base=2)
      ax.set_xticks(lengths, [str(T) for T in lengths])
      ax.minorticks_off()
      ax.set_xlabel("sequence length")
  axes[0, 0].legend(fontsize=7, loc="lower left")
  axes[1, 0].legend(fontsize=7, loc="lower left")
  # x: the RWKV-7 state size of each (n_embd, head_size); the Transformer of the same shape
  # sits at the same x (its KV cache, in the table, does not depend on head size).
  ax = axes[0, -1]
  mq = grid.mqar
  state_of = {shape: mq.n_layer * shape[0] * shape[1] for shape in mq.shapes}
  for model in MODELS:
    points = sorted((state_of[r.n_embd, r.head_size], 100 * r.accuracy) for r in recall if r.model == model)
    ax.plot(*zip(*points), color=colors[model], marker=markers[model], label=f"{model} of that shape")
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted(state_of.values()), [f"{state_of[C, N]}\nC={C} N={N}" for C, N in sorted(state_of, key=state_of.get)],
                fontsize=7)
  ax.minorticks_off()
  ax.set_ylim(0, 102)
  ax.set_xlabel("RWKV-7 state size (numbers)")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"MQAR, {grid.mqar.num_pairs} pairs, L={grid.mqar.n_layer}")
  ax.legend(fontsize=7, loc="lower right")
  axes[1, -1].axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100, metadata={"Software": None})
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  """Exit status 0, or 2 with one line for a bad --grid, grid file or --out."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--grid", default="reduced",
                      help="reduced | full | a grid YAML file (default: reduced)")
  parser.add_argument("--out", type=Path, default=DOCS, help="directory for the .md and .png")
  args = parser.parse_args(argv)
  try:
    grid = load_grid(grid_path(args.grid))
    check_writable(args.out)
  except GoosejaxError as e:
    print(f"state_tracking.py: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"state_tracking.py: error: {describe_os_error(e)}", file=sys.stderr)
    return 2
  command = "python experiments/state_tracking.py" + ("" if args.grid == "reduced" else f" --grid {args.grid}")
  start = time.perf_counter()
  words = run_word_problems(grid)
  recall = run_mqar(grid)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "state_tracking.md").write_text(markdown(grid, command, words, recall))
  plot(grid, words, recall, args.out / "state_tracking.png")
  _log(f"wrote {args.out / 'state_tracking.md'} and state_tracking.png in {time.perf_counter() - start:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
