"""Which sample indices a rank reads in an epoch: reshuffled from the seed, disjoint across ranks.

Training reads one global order per epoch, a permutation seeded by (seed, epoch), in global batches of
`world_size * batch_size` samples: global step s reads samples [s * G, (s + 1) * G) of the permutation, and
rank r takes its r-th `batch_size` slice. So the samples of a step, and the order of the steps, do not depend
on how many ranks share the global batch: a run may resume mid-epoch on another world size with the same
global batch (`engine.elastic`).
"""
from __future__ import annotations

import torch
from torch import Tensor


def epoch_indices(n: int, *, epoch: int, seed: int, rank: int, world_size: int, train: bool,
                  batch_size: int = 1) -> Tensor:
    """Train: rank `rank`'s share of the (seed, epoch) permutation, `n // world_size` samples: its slice of
    each full global batch, then its part of the remainder (a last, partial batch; the samples past
    `world_size * (n // world_size)` are dropped). Val: the natural order, strided so the ranks together
    cover every sample exactly once."""
    if not train:
        return torch.arange(rank, n, world_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // world_size
    full = per_rank // batch_size * batch_size  # samples of this rank in full batches
    rest = per_rank - full
    batches = perm[:full * world_size].view(-1, world_size, batch_size)[:, rank].reshape(-1)
    tail = perm[full * world_size:per_rank * world_size].view(world_size, rest)[rank]
    return torch.cat([batches, tail])
