"""RWKV-LM's "magic prime" sample order (docs/architecture.md#training-data-binidx-and-sample-order).

Slot = (c * ii^3) mod P with ii = j + 1 for the global sample index j, c = int(P * (sqrt(5)-1)/2)
and P the largest prime with P % 3 == 2 and P <= n_tokens // ctx_len - 1 (make_data.py's
rule). Cubing is a bijection modulo such a P, so P consecutive samples visit every slot once.
"""
from __future__ import annotations

import math


def is_prime(n: int) -> bool:
  if n < 2:
    return False
  if n % 2 == 0 or n % 3 == 0:
    return n in (2, 3)
  f = 5
  while f * f <= n:
    if n % f == 0 or n % (f + 2) == 0:
      return False
    f += 6
  return True


def largest_magic_prime(bound: int) -> int | None:
  """Largest prime P <= bound with P % 3 == 2 (cubing is then a bijection mod P)."""
  for candidate in range(bound, 1, -1):
    if candidate % 3 == 2 and is_prime(candidate):
      return candidate
  return None


def magic_prime(n_tokens: int, ctx_len: int) -> int | None:
  """RWKV-LM's magic_prime for a stream of `n_tokens` (make_data.py's rule)."""
  return largest_magic_prime(n_tokens // ctx_len - 1)


class MagicPrimeOrder:
  """Global sample index j -> window slot, exactly as RWKV-LM's dataset.py (ii = j + 1)."""

  def __init__(self, prime: int):
    self.prime = prime
    self.factor = int(prime * ((math.sqrt(5) - 1) / 2))

  def __call__(self, j: int) -> int:
    return self.factor * pow(int(j) + 1, 3, self.prime) % self.prime
