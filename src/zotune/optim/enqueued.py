"""The update of an in-place SGD step, enqueued on the GPU before the step's losses are read back.

The host learns a step's losses only by waiting for its last forward. Launched after that wait, the update
pass starts once the host has also done the work of launching it (the plan lookup and the kernel launch:
about 1 ms a step over OPT-1.3B's 388 tensors on an H200, docs/benchmarks.md), and the GPU idles meanwhile.
Enqueued behind the last forward instead, it runs while the host reads the losses back.

For that its coefficients are computed on the device from the losses still there. They must be the ones
the host would compute, bit for bit: a replay recomputes them from the logged losses on the host, and the
weights it rebuilds must equal the run's. So the arithmetic here repeats the host's (``mean_losses``,
:meth:`SPSA.projected_gradients`, the optimizer's ``-lr * g / q``, ``merge_terms``) operation for operation
on float64 tensors: the same IEEE-754 double operations in the same order give the same numbers. Every
division is tensor by tensor, since a GPU divides by a Python number as a multiplication by its
reciprocal, which rounds differently. A step whose losses are not all finite updates nothing, as on the
host: its coefficients are zero (the pass then only restores the weights).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .estimators import SPSA
from .perturbations import DrawKey


def _exact(value: float, like: Tensor) -> Tensor:
    """``value`` as a float64 scalar on ``like``'s device, written by a fill kernel (no copy from the host)."""
    return torch.full((), value, dtype=torch.float64, device=like.device)


def point_losses(measured: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Each point's mean micro-batch loss (float64, on the device), as ``mean_losses`` computes it:
    Python's ``sum`` (0 + v0 + v1 + ...) over the losses, divided by their count."""
    means = []
    for values in measured:
        total = sum(v.to(torch.float64) for v in values)
        means.append(total / _exact(len(values), total))
    return means


def projected_gradients(measured: Sequence[Sequence[Tensor]], estimator: SPSA) -> list[Tensor]:
    """g_1..g_q (float64, on the device) as :meth:`SPSA.projected_gradients` computes them from the losses
    ``mean_losses`` reads back; each zero when any loss or g is not finite (the step is then skipped)."""
    losses = point_losses(measured)
    denominator = _exact(estimator.denominator, losses[0])
    grads = [(losses[a] - losses[b]) / denominator for a, b in estimator.differences(len(losses))]
    finite = torch.isfinite(torch.stack(losses + grads)).all()
    return [torch.where(finite, g, 0.0) for g in grads]


def update_terms(grads: Sequence[Tensor], keys: Sequence[DrawKey], lr: float) -> list[tuple[Tensor, DrawKey]]:
    """The SGD update's terms ``(-lr * g_i / q, key_i)``, as the optimizer writes them on the host."""
    q = _exact(len(keys), grads[0])
    return [(-lr * g / q, key) for g, key in zip(grads, keys)]
