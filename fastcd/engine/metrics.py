"""Running statistics kept on the device and read only at log time (one intentional sync)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose label is among the top-k logits, for each k (a device tensor)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top == labels.unsqueeze(1)
    return torch.stack([hit[:, :min(k, k_max)].any(dim=1).sum() for k in ks]).float()


class Meter:
    """Sums of loss terms, weighted totals, top-k hits and sample counts; first non-finite step."""

    def __init__(self, num_terms: int, device: torch.device) -> None:
        self.sums = torch.zeros(num_terms + 4, device=device, dtype=torch.float64)  # terms, total, top1, top5, n
        self.steps = 0
        self.bad_step = torch.full((), -1, device=device, dtype=torch.int64)
        self.bad_terms = torch.zeros(num_terms, device=device)

    def update(self, terms: Tensor, total: Tensor, logits: Tensor, labels: Tensor, step: int) -> None:
        labels = labels.reshape(-1)  # a one-sample batch may come with 0-d labels
        n = labels.shape[0]
        hits = topk_correct(logits.detach(), labels)
        count = torch.full((1,), n, device=terms.device, dtype=torch.float64)  # a fill, not a host->device copy
        row = torch.cat([terms.double() * n, (total * n).double().view(1), hits.double(), count])
        self.sums += row
        first_bad = (~torch.isfinite(total)) & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_terms = torch.where(first_bad, terms, self.bad_terms)
        self.steps += 1

    def reduce(self) -> None:
        """Sum across ranks (DDP)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def read(self) -> dict[str, float | list[float]]:
        """Means over samples (host values: syncs with the device)."""
        return self.read_since(None)[0]

    def read_since(self, mark: list[float] | None) -> tuple[dict[str, float | list[float]], list[float]]:
        """Means over the samples since `mark` (an earlier returned mark; None: all), and the new mark."""
        now = self.sums.tolist()  # intentional sync: log time only
        s = [a - b for a, b in zip(now, mark)] if mark is not None else now
        n = max(s[-1], 1.0)
        return {"terms": [v / n for v in s[:-4]], "total": s[-4] / n, "top1_err": 100 * (1 - s[-3] / n),
                "top5_err": 100 * (1 - s[-2] / n), "samples": int(s[-1])}, now
