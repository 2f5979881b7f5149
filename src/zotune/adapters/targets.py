"""Default adapter targets of a model, read from its family's entry (:mod:`zotune.models.families`).

adp: where LoRETTA_adp / AdaZeta put their tensorized adapters, and on which side of the target
("pre": on the layer's input, "post": on its output). rep (and PEFT LoRA): the query and value
projections.
"""

from __future__ import annotations

from ..models.families import family_of, model_type_of


def adapter_targets(model) -> dict[str, str]:
    return family_of(model_type_of(model), "default adapter targets", "target_modules= with the module names to adapt"
                     ).adapter_targets


def rep_targets(model) -> tuple[str, ...]:
    return family_of(model_type_of(model), "default rep/LoRA targets", "target_modules= with the module names to adapt"
                     ).rep_targets
