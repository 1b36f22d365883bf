"""LoRA: the torch layer, its injection into a model, and its PEFT naming.

Numerics follow PEFT's ``lora.Linear`` exactly (``base(x) + lora_B(lora_A(x)) * scaling``) so a
PyTorch+PEFT step and an exported step agree to float rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgetune.errors import ExportError
from edgetune.export.methods import Trainable, register
from edgetune.methods.lora import LORA as SPEC, TENSOR_ROLES, LoraConfig, pattern_key


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    base.weight: (out, in) frozen; lora_A: (r, in); lora_B: (out, r), zero at start so the
    wrapped layer starts equal to the base layer.
    """

    adapter_tensor_names = TENSOR_ROLES  # declared, not searched for in the graph

    def __init__(self, base: nn.Linear, rank: int, scaling: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scaling = scaling

    @classmethod
    def from_base(cls, base: nn.Linear, config: LoraConfig, generator: torch.Generator, path: str = "") -> "LoraLinear":
        """Wrap ``base``, the layer at module ``path`` (whose rank and scaling the config's patterns may set)."""
        layer = cls(base, config.rank_of(path), config.scaling_of(path))
        # PEFT's default init: kaiming_uniform_(a=sqrt(5)) on A -> U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            layer.lora_A.uniform_(-bound, bound, generator=generator)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        lora = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return self.base(x) + lora * self.scaling

    def merge(self) -> nn.Linear:
        """Fold the update into the base weight: W' = W + scaling * B @ A (as ``LoraSpec.weight_delta``)."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.scaling * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def _linear_names(model: nn.Module) -> set[str]:
    return {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, nn.Linear)}


def target_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths of the linear layers ``config.targets`` names, in model order.

    ``all-linear`` is PEFT's shorthand: every ``nn.Linear`` except the model's output embedding
    (the LM head), as ``peft.tuners.tuners_utils._maybe_include_all_linear_layers`` resolves it.
    Otherwise a target is the last name of a layer (``q_proj``).
    """
    linear = [path for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if config.all_linear:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [path for path in linear if model.get_submodule(path) is not head]
    available = _linear_names(model)
    missing = [t for t in config.targets if t not in available]
    if missing:
        raise ExportError(
            f"target module(s) {', '.join(missing)} not found in this model; "
            f"linear layers it has: {', '.join(sorted(available))} (or all-linear)."
        )
    return [path for path in linear if path.rsplit(".", 1)[-1] in config.targets]


def _check_patterns(config: LoraConfig, paths: list[str]) -> None:
    """A pattern key that matches no adapted layer is a typo, not a no-op: refuse it by name."""
    unused = [f"{flag} {key!r}" for flag, pattern in (("--rank-pattern", config.rank_pattern),
                                                      ("--alpha-pattern", config.alpha_pattern))
              for key in pattern if not any(pattern_key([key], path) == key for path in paths)]
    if unused:
        shown = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))
        raise ExportError(f"{', '.join(unused)} match(es) none of the adapted layers ({shown}, e.g. {paths[0]}); "
                          "give a layer name or a pattern matching the end of a module path.")


class _Lora:
    name = SPEC.name
    config_class = LoraConfig

    def inject(self, model: nn.Module, config: LoraConfig) -> list[Trainable]:
        """Wrap every targeted ``nn.Linear`` (rank and scaling per its patterns); freeze everything else."""
        if not isinstance(config, LoraConfig):
            raise ExportError(f"method lora needs a LoraConfig, got {type(config).__name__}.")
        paths = target_paths(model, config)
        _check_patterns(config, paths)
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(config.seed)
        declared: list[Trainable] = []
        for path in paths:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, LoraLinear.from_base(model.get_submodule(path), config, generator, path))
            for attr in LoraLinear.adapter_tensor_names:
                declared.append(Trainable(path, attr, SPEC.peft_key(path, attr)))
        if config.freeze_a:  # FFA-LoRA: A is a constant of the graphs (see ``fixed``), B alone trains
            for t in declared:
                if t.attr == "lora_A":
                    model.get_submodule(t.module_path).lora_A.requires_grad_(False)
            declared = [t for t in declared if t.attr != "lora_A"]
        return declared

    def fixed(self, model: nn.Module, config: LoraConfig) -> list[Trainable]:
        """Adapter tensors that are part of the adapter but never trained: every lora_A under
        ``freeze_a`` (call after ``inject``). The exporter keeps them exact (``edgetune.fixed_adapter``)."""
        if not config.freeze_a:
            return []
        return [Trainable(path, "lora_A", SPEC.peft_key(path, "lora_A"))
                for path, m in model.named_modules() if isinstance(m, LoraLinear)]

    def peft_config(self, config: LoraConfig, base_model: str) -> dict:
        return SPEC.peft_config(config, base_model)


LORA = register(_Lora())
