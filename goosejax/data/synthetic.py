"""Synthetic expressivity tasks as Grain random-access data sources.

* Group word problems (Merrill et al. 2024, "The Illusion of State"): the input is a sequence
  of group elements g_1 .. g_T, the target at every position t the running product
  g_1 · g_2 · ... · g_t. Groups: Z60 (abelian), A4×Z5 (solvable, non-abelian), A5 (the smallest
  non-solvable group: its word problem is NC¹-complete) and S5.
* Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): key-value pairs, then
  every key queried once in random order; only the answers are scored.

Every example is a dict of equal-length arrays: "inputs" and "targets" (int32 token ids) and
"loss_mask" (bool: which targets count). Example `i` of a source depends only on (seed, i), so
a source can be read in any order, by any number of workers, and re-created identically.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
from typing import Sequence

import numpy as np

Permutation = tuple[int, ...]


# ----------------------------------------------------------------------------- groups


@dataclasses.dataclass(frozen=True, eq=False)
class FiniteGroup:
  """A finite group as its Cayley table over element ids 0 .. order-1; id 0 is the identity.

  table[a, b] is the id of a·b, where elements are permutations and a·b = "b first, then a"
  (a·b)(i) = a(b(i)); the running product of g_1 .. g_t is g_1 · ... · g_t.
  """
  name: str
  table: np.ndarray          # [order, order] int32

  @property
  def order(self) -> int:
    return self.table.shape[0]

  def running_products(self, elements_T: np.ndarray) -> np.ndarray:
    """[T] element ids -> [T] ids of g_1 · ... · g_t."""
    products_T = np.empty(len(elements_T), np.int32)
    product = 0
    for t, element in enumerate(elements_T):
      product = self.table[product, element]
      products_T[t] = product
    return products_T


def group_from_permutations(name: str, permutations: Sequence[Permutation]) -> FiniteGroup:
  """The group of `permutations` (all of it: a set closed under composition), ids in sorted
  order, so the identity (0, 1, ..., n-1) gets id 0."""
  elements = sorted(set(permutations))
  ids = {p: i for i, p in enumerate(elements)}
  table = np.array([[ids[tuple(a[i] for i in b)] for b in elements] for a in elements], np.int32)
  return FiniteGroup(name, table)


def cyclic_permutations(n: int) -> list[Permutation]:
  """Z_n as the rotations of n points."""
  return [tuple((i + shift) % n for i in range(n)) for shift in range(n)]


def _is_even(permutation: Permutation) -> bool:
  inversions = sum(a > b for a, b in itertools.combinations(permutation, 2))
  return inversions % 2 == 0


def symmetric_permutations(n: int) -> list[Permutation]:
  return list(itertools.permutations(range(n)))


def alternating_permutations(n: int) -> list[Permutation]:
  return [p for p in itertools.permutations(range(n)) if _is_even(p)]


def product_permutations(left: Sequence[Permutation],
                         right: Sequence[Permutation]) -> list[Permutation]:
  """The direct product, acting on the disjoint union of both point sets."""
  offset = len(left[0])
  return [a + tuple(offset + i for i in b) for a in left for b in right]


_GROUPS = {
    "Z60": lambda: cyclic_permutations(60),
    "A4xZ5": lambda: product_permutations(alternating_permutations(4), cyclic_permutations(5)),
    "A5": lambda: alternating_permutations(5),
    "S5": lambda: symmetric_permutations(5),
}
GROUP_NAMES = tuple(_GROUPS)


@functools.cache
def make_group(name: str) -> FiniteGroup:
  """One of GROUP_NAMES: Z60, A4xZ5, A5 (order 60 each) or S5 (order 120)."""
  if name not in _GROUPS:
    raise ValueError(f"unknown group {name!r}; known: {list(GROUP_NAMES)}")
  return group_from_permutations(name, _GROUPS[name]())


# ----------------------------------------------------------------------------- sources


def _example_rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng((seed, index))


class _Source(abc.ABC):
  """Grain's RandomAccessDataSource protocol over `num_examples` seeded examples."""

  def __init__(self, num_examples: int, seed: int):
    if num_examples <= 0:
      raise ValueError(f"num_examples={num_examples}: expected a positive count")
    self.num_examples = num_examples
    self.seed = seed

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"{type(self).__name__} has {self.num_examples} examples, got index {index}")
    return self._example(_example_rng(self.seed, index))

  @abc.abstractmethod
  def _example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One example drawn from `rng`, seeded by (seed, index)."""


class GroupWordProblem(_Source):
  """Uniform random words of `seq_len` elements of `group`; targets are the running products.

  Tokens are element ids, so the vocabulary is the group's order.
  """

  def __init__(self, group: FiniteGroup, seq_len: int, num_examples: int, seed: int):
    super().__init__(num_examples, seed)
    self.group = group
    self.seq_len = seq_len

  @property
  def vocab_size(self) -> int:
    return self.group.order

  def _example(self, rng):
    elements_T = rng.integers(0, self.group.order, self.seq_len, dtype=np.int32)
    return {"inputs": elements_T, "targets": self.group.running_products(elements_T),
            "loss_mask": np.ones(self.seq_len, bool)}


class MultiQueryAssociativeRecall(_Source):
  """k_1 v_1 ... k_n v_n  q_1 a_1 ... q_n a_n with n = `num_pairs`.

  Keys are distinct ids in [0, num_keys), values ids in [num_keys, num_keys + num_values)
  (repeats allowed); the queries q_i are the keys in a random order. At each query position
  the target is that key's value a_i, the only scored targets; the answer is also the next
  input (teacher forcing), as a language model would see it. Sequence length 4n.
  """

  def __init__(self, num_pairs: int, num_keys: int, num_values: int, num_examples: int, seed: int):
    super().__init__(num_examples, seed)
    if num_pairs > num_keys:
      raise ValueError(f"num_pairs={num_pairs} needs as many distinct keys; num_keys={num_keys}")
    self.num_pairs = num_pairs
    self.num_keys = num_keys
    self.num_values = num_values

  @property
  def seq_len(self) -> int:
    return 4 * self.num_pairs

  @property
  def vocab_size(self) -> int:
    return self.num_keys + self.num_values

  def _example(self, rng):
    n = self.num_pairs
    keys_N = rng.choice(self.num_keys, n, replace=False).astype(np.int32)
    values_N = (self.num_keys + rng.integers(0, self.num_values, n)).astype(np.int32)
    order_N = rng.permutation(n)
    context_2N = np.stack([keys_N, values_N], axis=1).reshape(-1)
    queries_2N = np.stack([keys_N[order_N], values_N[order_N]], axis=1).reshape(-1)
    inputs_T = np.concatenate([context_2N, queries_2N])
    is_query_T = np.zeros(4 * n, bool)
    is_query_T[2 * n::2] = True
    targets_T = np.zeros(4 * n, np.int32)
    targets_T[is_query_T] = values_N[order_N]
    return {"inputs": inputs_T, "targets": targets_T, "loss_mask": is_query_T}
