"""Training losses of the MeZO protocol, over encoded examples."""

from __future__ import annotations

import torch.nn.functional as F
import torch
from torch import Tensor, nn

from ..eval.scoring import Encoded, candidate_scores, gold_lm_loss


def classification_loss(model: nn.Module, batch: list[Encoded], pad_id: int, copies: int | None = None) -> Tensor:
    """Cross-entropy over the candidates' mean log-likelihoods ("train as classification").

    With ``copies=S`` the batch is repeated S times (copy-major, as the batched and virtual paths
    expect) and the S per-copy mean losses are returned.
    """
    scores = candidate_scores(model, batch, pad_id, copies or 1)  # (S·B, C)
    labels = torch.tensor([ex.label for ex in batch] * (copies or 1), device=scores.device)
    losses = F.cross_entropy(scores, labels, reduction="none")
    return losses.mean() if copies is None else losses.view(copies, -1).mean(dim=1)


def lm_loss(model: nn.Module, batch: list[Encoded], pad_id: int, copies: int | None = None) -> Tensor:
    """LM loss on the gold candidates' tokens (token mean), per copy with ``copies=S``."""
    return gold_lm_loss(model, batch, pad_id, copies=copies)


LOSSES = {"classification": classification_loss, "lm": lm_loss}
