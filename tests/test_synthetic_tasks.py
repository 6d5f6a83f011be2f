"""The synthetic expressivity tasks: the groups are the right groups, word-problem targets are
running products, MQAR answers are the queried keys' values, and every source is a
deterministic Grain random-access source."""
import grain
import numpy as np
import pytest

from goosejax.data.synthetic import (GROUP_NAMES, GroupWordProblem, MultiQueryAssociativeRecall,
                                     alternating_permutations, cyclic_permutations, make_group,
                                     product_permutations, symmetric_permutations)

PERMUTATIONS = {
    "Z60": lambda: cyclic_permutations(60),
    "A4xZ5": lambda: product_permutations(alternating_permutations(4), cyclic_permutations(5)),
    "A5": lambda: alternating_permutations(5),
    "S5": lambda: symmetric_permutations(5),
}


def _inverse_ids(table):
  return np.argmax(table == 0, axis=1)


def _subgroup_generated_by(table, ids):
  subgroup, frontier = {0}, set(ids)
  while frontier:
    subgroup |= frontier
    frontier = {int(table[a, b]) for a in subgroup for b in subgroup} - subgroup
  return subgroup


def _derived_series_orders(table):
  """Orders of G, [G,G], [[G,G],[G,G]], ... until it stops shrinking."""
  inverse = _inverse_ids(table)
  current = set(range(len(table)))
  orders = [len(current)]
  while True:
    commutators = {int(table[table[a, b], table[inverse[a], inverse[b]]]) for a in current for b in current}
    derived = _subgroup_generated_by(table, commutators)
    if len(derived) == len(current):
      return orders
    current = derived
    orders.append(len(current))


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_tables_are_groups(name):
  table = make_group(name).table
  n = len(table)
  ids = np.arange(n)
  assert table.min() >= 0 and table.max() < n                            # closure
  np.testing.assert_array_equal(table[0], ids)                           # 0 is a left identity
  np.testing.assert_array_equal(table[:, 0], ids)                        # and a right identity
  assert all((row == 0).sum() == 1 for row in table)                     # every element has an inverse
  inverse = _inverse_ids(table)
  np.testing.assert_array_equal(table[inverse, ids], np.zeros(n))        # ... on both sides
  left = table[table[:, :, None], ids[None, None, :]]                    # (ab)c
  right = table[ids[:, None, None], table[None, :, :]]                   # a(bc)
  np.testing.assert_array_equal(left, right)                             # associativity


def test_orders_and_structure():
  orders = {name: make_group(name).order for name in GROUP_NAMES}
  assert orders == {"Z60": 60, "A4xZ5": 60, "A5": 60, "S5": 120}
  is_abelian = lambda table: np.array_equal(table, table.T)
  assert is_abelian(make_group("Z60").table)
  for name in ("A4xZ5", "A5", "S5"):
    assert not is_abelian(make_group(name).table)
  z60 = make_group("Z60").table
  assert len(_subgroup_generated_by(z60, {1})) == 60                     # cyclic: element 1 generates it
  # A5 is perfect (non-solvable); A4xZ5 is solvable: A4xZ5 > V4 > 1; S5 > A5 = [A5, A5].
  assert _derived_series_orders(make_group("A5").table) == [60]
  assert _derived_series_orders(make_group("A4xZ5").table) == [60, 4, 1]
  assert _derived_series_orders(make_group("S5").table) == [120, 60]


def test_unknown_group_is_refused():
  with pytest.raises(ValueError, match="unknown group 'Q8'"):
    make_group("Q8")


@pytest.mark.parametrize("name", GROUP_NAMES)
def test_running_products_match_composed_permutations(name):
  """Slow reference: compose the permutations themselves, left to right."""
  group = make_group(name)
  elements = sorted(set(PERMUTATIONS[name]()))
  source = GroupWordProblem(group, seq_len=12, num_examples=5, seed=3)
  for index in range(len(source)):
    example = source[index]
    product = tuple(range(len(elements[0])))
    for t, element in enumerate(example["inputs"]):
      g = elements[element]
      product = tuple(product[g[i]] for i in range(len(g)))             # product · g
      assert elements[example["targets"][t]] == product
    assert example["loss_mask"].all()


def test_word_problem_targets_depend_on_order_in_non_abelian_groups():
  group = make_group("A5")
  a, b = 1, 2
  while group.table[a, b] == group.table[b, a]:
    b += 1
  assert group.running_products(np.array([a, b]))[-1] != group.running_products(np.array([b, a]))[-1]


def test_mqar_answers_are_the_queried_values():
  source = MultiQueryAssociativeRecall(num_pairs=6, num_keys=16, num_values=10, num_examples=20, seed=1)
  assert source.seq_len == 24 and source.vocab_size == 26
  for index in range(len(source)):
    example = source[index]
    inputs, targets, mask = example["inputs"], example["targets"], example["loss_mask"]
    keys, values = inputs[:12:2], inputs[1:12:2]
    assert len(set(keys.tolist())) == 6 and (keys < 16).all()
    assert ((values >= 16) & (values < 26)).all()
    value_of = dict(zip(keys.tolist(), values.tolist()))
    query_positions = np.flatnonzero(mask)
    np.testing.assert_array_equal(query_positions, np.arange(12, 24, 2))
    assert sorted(inputs[query_positions].tolist()) == sorted(keys.tolist())   # each key queried once
    for t in query_positions:
      assert targets[t] == value_of[int(inputs[t])]
      assert inputs[t + 1] == targets[t]                                       # teacher-forced answer


def test_mqar_needs_enough_distinct_keys():
  with pytest.raises(ValueError, match="num_pairs=9"):
    MultiQueryAssociativeRecall(num_pairs=9, num_keys=8, num_values=8, num_examples=1, seed=0)


@pytest.mark.parametrize("make", [
    lambda seed: GroupWordProblem(make_group("S5"), 16, 50, seed),
    lambda seed: MultiQueryAssociativeRecall(8, 32, 32, 50, seed),
], ids=["word_problem", "mqar"])
def test_sources_are_deterministic_random_access(make):
  source, again, other_seed = make(0), make(0), make(1)
  assert len(source) == 50
  for index in (49, 0, 17):                                   # any order gives the same examples
    for key, value in source[index].items():
      np.testing.assert_array_equal(value, again[index][key])
  assert not np.array_equal(source[3]["inputs"], source[4]["inputs"])
  assert not np.array_equal(source[3]["inputs"], other_seed[3]["inputs"])
  for bad in (50, -1):
    with pytest.raises(IndexError):
      source[bad]
  batch = grain.MapDataset.source(source).batch(8, drop_remainder=True)[2]
  np.testing.assert_array_equal(batch["inputs"][0], source[16]["inputs"])
  assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == bool
