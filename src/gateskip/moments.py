"""Streaming least-squares sums and their closed-form solutions, for the fallback fit (fallback_fit.py)
and the gate fit (gatefit.py): ``Moments`` accumulates float64 sums of X^T X, X^T Y, sum X, sum Y,
sum ||Y||^2 and the token count of one branch's (x, y) pairs (O(H^2) memory, any number of batches) and
ridge-solves the centered least-squares problem with an intercept (``mean``, ``linear`` or reduced-rank
``lowrank``); ``neuron_gain`` scores, from sums over [x, h], the output variance each MLP neuron would
explain on top of the linear map of x."""

from __future__ import annotations

import torch


class Moments:
    """Streaming float64 sums of one branch's (x, y) pairs: enough for a ridge fit with intercept."""

    def __init__(self, hidden: int, full: bool, device, out: int | None = None):
        dev = torch.device("cpu") if torch.device(device).type == "mps" else device  # mps has no float64
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=dev)  # noqa: E731
        out = hidden if out is None else out  # width of y (gatefit.py regresses one value per token)
        self.n, self.yy = 0, z(())
        self.sx, self.sy = z(hidden), z(out)
        self.xx, self.xy = (z(hidden, hidden), z(hidden, out)) if full else (None, None)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x``, ``y``: [N, H] (real tokens only)."""
        x, y = x.to(self.sx.device, torch.float64), y.to(self.sx.device, torch.float64)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.yy += (y * y).sum()
        if self.xx is not None:
            self.xx.addmm_(x.T, x)
            self.xy.addmm_(x.T, y)

    def select(self, cols: torch.Tensor) -> Moments:
        """The sums of the inputs ``cols`` only (and every output)."""
        sub = Moments.__new__(Moments)
        sub.n, sub.yy, sub.sy = self.n, self.yy, self.sy
        sub.sx = self.sx[cols]
        sub.xx, sub.xy = self.xx[cols][:, cols], self.xy[cols]
        return sub

    def solve(self, weights: bool, rank: int | None, ridge: float) -> tuple[object, torch.Tensor, float]:
        """(weights, bias, R^2 on the fitted data). Weights: None (``weights`` False: the mean), W (``rank``
        None: a full map) or (A, B) (rank ``rank``)."""
        n = self.n
        mx, my = self.sx / n, self.sy / n
        sst = float(self.yy - n * my.dot(my))
        if not weights:
            return None, my, 0.0
        cxx = self.xx - n * torch.outer(mx, mx)
        cxy = self.xy - n * torch.outer(mx, my)
        h = cxx.shape[0]
        # ridge relative to the mean input variance: scale-free, and the same for any split of the data
        lam = ridge * float(cxx.diagonal().sum()) / h
        lam = lam if lam > 0 else max(ridge, 1e-12)
        w = torch.linalg.solve(cxx + lam * torch.eye(h, dtype=cxx.dtype, device=cxx.device), cxy)
        fitted = w.T @ cxx @ w  # (X W)^T (X W), centered: its eigenvectors are X W's right singular vectors
        if rank is not None:
            _, vecs = torch.linalg.eigh((fitted + fitted.T) / 2)
            v = vecs[:, -rank:].flip(1)  # top-R, largest first
            weights = (w @ v, v.T)
            w = weights[0] @ weights[1]
            fitted = w.T @ cxx @ w
        else:
            weights = w
        sse = sst - 2 * float((w * cxy).sum()) + float(fitted.diagonal().sum())
        return weights, my - mx @ w, (1.0 - sse / sst) if sst > 0 else 0.0


def neuron_gain(m: Moments, hidden: int, ridge: float) -> torch.Tensor:
    """Per neuron, the output variance it would explain alone on top of the ridge fit of y on x.

    ``m``: sums over z = [x, h] (``hidden`` + I inputs). With r = h - x P_h and e = y - x P_y the residuals of
    the neuron activations and of y on x, gain_i = |cov(r_i, e)|^2 / var(r_i), all from the centered sums."""
    n = m.n
    mz = m.sx / n
    czz = m.xx - n * torch.outer(mz, mz)
    czy = m.xy - n * torch.outer(mz, m.sy / n)
    cxx, cxh, chh_diag = czz[:hidden, :hidden], czz[:hidden, hidden:], czz.diagonal()[hidden:]
    cxy, chy = czy[:hidden], czy[hidden:]
    lam = ridge * float(cxx.diagonal().sum()) / hidden
    lam = lam if lam > 0 else max(ridge, 1e-12)
    p = torch.linalg.solve(cxx + lam * torch.eye(hidden, dtype=cxx.dtype, device=cxx.device),
                           torch.cat([cxh, cxy], 1))
    ph, py = p[:, :cxh.shape[1]], p[:, cxh.shape[1]:]
    cov_re = chy - ph.T @ cxy - cxh.T @ py + ph.T @ (cxx @ py)
    var_r = chh_diag - 2 * (ph * cxh).sum(0) + (ph * (cxx @ ph)).sum(0)
    return (cov_re * cov_re).sum(1) / var_r.clamp_min(1e-12 * max(float(chh_diag.max()), 1e-30))
