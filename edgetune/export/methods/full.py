"""Full fine-tuning: no layer is wrapped; every parameter of the model becomes trainable.

Tied parameters (the LM head sharing the embedding table) are one tensor: ``named_parameters``
yields each shared parameter once, under its first name (``model.embed_tokens.weight``), and the
exported graph holds it once, read by both the embedding lookup and the head, so its gradient
is the sum of both uses, as in PyTorch.
"""

from __future__ import annotations

from torch import nn

from edgetune.errors import ExportError
from edgetune.export.methods import Trainable, register
from edgetune.methods.full import FULL as SPEC, FullConfig


class _Full:
    name = SPEC.name
    config_class = FullConfig

    def inject(self, model: nn.Module, config: FullConfig) -> list[Trainable]:
        if not isinstance(config, FullConfig):
            raise ExportError(f"method full needs a FullConfig, got {type(config).__name__}.")
        declared = []
        for name, p in model.named_parameters():  # each shared (tied) parameter once
            p.requires_grad_(True)
            module_path, _, attr = name.rpartition(".")
            if attr not in SPEC.tensor_roles:
                raise ExportError(f"parameter {name!r} is neither a weight nor a bias; full fine-tuning of this "
                                  "architecture is not supported.")
            declared.append(Trainable(module_path, attr, SPEC.peft_key(module_path, attr)))
        return declared

    def peft_config(self, config: FullConfig, base_model: str) -> dict:
        return SPEC.peft_config(config, base_model)  # PEFT has none: the folder description (edgetune.methods.full)


FULL = register(_Full())
