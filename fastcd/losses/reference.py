"""Float64 references of every loss, written straight from DESIGN.md's formulas.

Used by the tests and by `fastcd bench kernels` (which times only an impl that matches them); deliberately
plain (explicit exp/log, no fused ops).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _softmax64(x: Tensor, T: float) -> Tensor:
    z = x.double() / T
    z = z - z.max(dim=1, keepdim=True).values
    e = z.exp()
    return e / e.sum(dim=1, keepdim=True)


def ce_reference(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy, mean over the batch; smoothing mixes the one-hot target with a uniform one."""
    p = _softmax64(logits, 1.0)
    n, k = p.shape
    target = torch.full((n, k), label_smoothing / k, dtype=torch.float64, device=logits.device)
    target[torch.arange(n), labels] += 1.0 - label_smoothing
    return -(target * p.log()).sum(dim=1).mean()


def kd_row_reference(stu_logits: Tensor, tea_logits: Tensor, T: float) -> Tensor:
    """Per-sample KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes."""
    ps, pt = _softmax64(stu_logits, T), _softmax64(tea_logits, T)
    return (pt * (pt.log() - ps.log())).sum(dim=1) * T * T


def kd_reference(stu_logits: Tensor, tea_logits: Tensor, T: float) -> Tensor:
    """KD: the per-sample KL term averaged over the batch."""
    return kd_row_reference(stu_logits, tea_logits, T).mean()


def gkd_reference(stu_logits: Tensor, tea_logits: Tensor, labels: Tensor, T: float) -> Tensor:
    """Guided KD: the KD term over samples whose teacher argmax equals the label, / their count; 0 if none."""
    mask = tea_logits.double().argmax(dim=1) == labels
    rows = kd_row_reference(stu_logits, tea_logits, T)
    if not bool(mask.any()):
        return rows.sum() * 0.0
    return rows[mask].sum() / mask.sum()


def cd_reference(stu_feats: Sequence[Tensor], tea_feats: Sequence[Tensor]) -> Tensor:
    """CD: sum over stages of mean_{n,c} (mean_{h,w} s - mean_{h,w} t)^2."""
    total = torch.zeros((), dtype=torch.float64, device=stu_feats[0].device)
    for s, t in zip(stu_feats, tea_feats, strict=True):
        s64, t64 = s.double(), t.double()
        hw_s, hw_t = s64.shape[2] * s64.shape[3], t64.shape[2] * t64.shape[3]
        ms = s64.sum(dim=(2, 3)) / hw_s
        mt = t64.sum(dim=(2, 3)) / hw_t
        total = total + ((ms - mt) ** 2).sum() / ms.numel()
    return total


def at_reference(stu_feats: Sequence[Tensor], tea_feats: Sequence[Tensor]) -> Tensor:
    """AT: sum over stages of mean_{n,j} (Q_s/||Q_s|| - Q_t/||Q_t||)^2, Q = mean over channels of x^2."""
    total = torch.zeros((), dtype=torch.float64, device=stu_feats[0].device)
    for s, t in zip(stu_feats, tea_feats, strict=True):
        maps = []
        for x in (s.double(), t.double()):
            q = (x * x).sum(dim=1).reshape(x.shape[0], -1) / x.shape[1]
            maps.append(q / (q * q).sum(dim=1, keepdim=True).sqrt())
        total = total + ((maps[0] - maps[1]) ** 2).sum() / maps[0].numel()
    return total


def fitnet_reference(conn_feats: Sequence[Tensor], tea_feats: Sequence[Tensor], stage: int) -> Tensor:
    """FitNets hint: mean squared error at stage `stage` (1-based)."""
    s, t = conn_feats[stage - 1].double(), tea_feats[stage - 1].double()
    return ((s - t) ** 2).sum() / s.numel()


def _huber64(x: Tensor) -> Tensor:
    return torch.where(x.abs() < 1.0, 0.5 * x * x, x.abs() - 0.5)


def _safe_norm64(v: Tensor) -> tuple[Tensor, Tensor]:
    """Euclidean norm over the last dim and a mask of the non-zero ones (no sqrt(0) in the graph)."""
    sq = (v * v).sum(dim=-1)
    nonzero = sq > 0
    return torch.where(nonzero, sq, torch.ones_like(sq)).sqrt() * nonzero, nonzero


def rkd_reference(stu_embed: Tensor, tea_embed: Tensor, distance_weight: float = 25.0,
                  angle_weight: float = 50.0) -> Tensor:
    """RKD: w_d * mean Huber(psi_D) over N^2 pairs + w_a * mean Huber(psi_A) over N^3 triplets.

    psi_D(i, j) = ||e_i - e_j|| / mu, mu = mean over pairs i != j (no scaling when mu = 0);
    psi_A(i, j, k) = <e_i - e_j, e_k - e_j> / (||e_i - e_j|| ||e_k - e_j||), 0 where an edge is empty.
    """
    psi_d, psi_a = [], []
    for e in (stu_embed.double().flatten(1), tea_embed.double().flatten(1)):
        n = e.shape[0]
        v = e.unsqueeze(1) - e.unsqueeze(0)  # v[i, j] = e_i - e_j
        dist, nonzero = _safe_norm64(v)
        mu = dist.sum() / max(n * (n - 1), 1)
        psi_d.append(dist / mu if bool(mu > 0) else dist)
        unit = v / torch.where(nonzero, dist, torch.ones_like(dist)).unsqueeze(-1)  # unit[i, j]: j -> i
        psi_a.append(torch.einsum("ijd,kjd->jik", unit, unit))
    loss_d = _huber64(psi_d[0] - psi_d[1]).mean()
    loss_a = _huber64(psi_a[0] - psi_a[1]).mean()
    return distance_weight * loss_d + angle_weight * loss_a
