"""Metrics of predicted against true flow maps (DESIGN.md, Evaluation)."""

from __future__ import annotations

import torch

COMPONENTS = ("v1", "v2", "v3", "z0")


class PearsonR2:
    """Streaming squared Pearson correlation per component over valid pixels (paper's R^2).

    Compares |v1|, |v2|, v3 and z0 (the paper's components: lateral motion is an orientation, so
    the sign of v1 relative to v2 is scored by the orientation error instead). Sums are float64,
    so any number of batches gives the exact value for all pixels together.
    """

    def __init__(self) -> None:
        self.sums = torch.zeros(6, 4, dtype=torch.float64)  # n, sx, sy, sxx, syy, sxy

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        """pred (B, >=4, H, W) canonical, target (B, 4, H, W), valid (B, 1, H, W) in {0, 1}."""
        x = pred[:, :4].detach().double().clone()
        y = target[:, :4].detach().double().clone()
        x[:, :2], y[:, :2] = x[:, :2].abs(), y[:, :2].abs()
        m = (valid > 0.5).expand_as(y)
        x, y = torch.where(m, x, 0), torch.where(m, y, 0)
        dims = (0, 2, 3)
        self.sums += torch.stack(
            [m.sum(dims).double(), x.sum(dims), y.sum(dims), (x * x).sum(dims), (y * y).sum(dims), (x * y).sum(dims)]
        ).cpu()

    def compute(self) -> dict[str, float]:
        """{component: R^2} and 'mean' (NaN where a component is constant or no pixel is valid)."""
        n, sx, sy, sxx, syy, sxy = self.sums
        cov = sxy - sx * sy / n
        var_x, var_y = sxx - sx * sx / n, syy - sy * sy / n
        r2 = cov**2 / (var_x * var_y)
        out = {c: float(v) for c, v in zip(COMPONENTS, r2)}
        out["mean"] = float(r2.mean())
        return out
