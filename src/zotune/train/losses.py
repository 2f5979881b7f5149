"""Training losses of the MeZO protocol, over encoded examples."""

from __future__ import annotations

import torch.nn.functional as F
import torch
from torch import Tensor, nn

from ..eval.scoring import Encoded, candidate_scores, gold_lm_loss


def classification_loss(model: nn.Module, batch: list[Encoded], pad_id: int) -> Tensor:
    """Cross-entropy over the candidates' mean log-likelihoods ("train as classification")."""
    scores = candidate_scores(model, batch, pad_id)  # (B, C)
    labels = torch.tensor([ex.label for ex in batch], device=scores.device)
    return F.cross_entropy(scores, labels)


LOSSES = {"classification": classification_loss, "lm": gold_lm_loss}
