"""Which sample indices a rank reads in an epoch: reshuffled from the seed, disjoint across ranks."""
from __future__ import annotations

import torch
from torch import Tensor


def epoch_indices(n: int, *, epoch: int, seed: int, rank: int, world_size: int, train: bool) -> Tensor:
    """Train: a permutation seeded by (seed, epoch), cut to equal disjoint shares (the remainder is
    dropped). Val: the natural order, strided so the ranks together cover every sample exactly once."""
    if not train:
        return torch.arange(rank, n, world_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // world_size
    return perm[rank * per_rank:(rank + 1) * per_rank]
