"""LoRA's config and spec (no torch): W x + scaling * B (A x), A: (rank, in), B: (out, rank).

The torch layer is ``edgetune.export.methods.lora.LoraLinear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import numpy as np

from edgetune.methods.base import MethodConfig, MethodSpec

TENSOR_ROLES = ("lora_A", "lora_B")  # declared once: the torch layer's parameters and the manifest's tensors
# adapter_config.json fields that must agree with the bundle's method config, by config field.
_PEFT_FIELDS = {"r": "rank", "lora_alpha": "alpha", "use_rslora": "use_rslora"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LoraConfig(MethodConfig):
    """Low-rank adaptation: W x + scaling * B (A x), A: (rank, in), B: (out, rank)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r of A (r x in) and B (out x r).", "cli": "--rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = alpha / r.", "cli": "--alpha"})
    targets: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={"help": "Comma-separated names of the linear layers to adapt.", "cli": "--targets"},
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (only 0 is exported)"})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scaling = alpha / sqrt(r).",
                                                      "cli": "--rslora"})
    seed: int = field(default=0, metadata={"help": "Seed for the initial LoRA A matrices (Kaiming-uniform, as PEFT).",
                                           "cli": "--seed"})
    freeze_a: bool = field(default=False, metadata={
        "help": "FFA-LoRA: keep every LoRA A at its seeded init (stored in the bundle) and train only B; deltas carry "
                "B alone (half the upload) and federated averaging of B is exact.", "cli": "--freeze-a"})

    name = "lora"

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, tuple)):
            self.targets = tuple(self.targets)
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = []
        if not _is_int(self.rank) or self.rank <= 0:
            problems.append(f"`rank` must be a positive integer, got {self.rank!r}")
        if not _is_real(self.alpha) or self.alpha <= 0:
            problems.append(f"`alpha` must be a positive number, got {self.alpha!r}")
        if (not isinstance(self.targets, tuple) or not self.targets
                or any(not isinstance(t, str) or not t for t in self.targets)):
            problems.append(f"`targets` must name at least one module, got {self.targets!r}")
        if not _is_real(self.dropout) or self.dropout != 0.0:
            problems.append(f"`dropout` must be 0 for an exported training graph, got {self.dropout!r}; drop the option")
        if not isinstance(self.use_rslora, bool):
            problems.append(f"`use_rslora` must be true or false, got {self.use_rslora!r}")
        if not _is_int(self.seed):
            problems.append(f"`seed` must be an integer, got {self.seed!r}")
        if not isinstance(self.freeze_a, bool):
            problems.append(f"`freeze_a` must be true or false, got {self.freeze_a!r}")
        return problems

    def to_dict(self) -> dict:
        d = super().to_dict()
        if not self.freeze_a:  # absent = False: plain-LoRA manifests and deltas stay as they were
            del d["freeze_a"]
        return d

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


class LoraSpec(MethodSpec):
    name = "lora"
    config_class = LoraConfig
    layer_module = "edgetune.export.methods.lora"
    tensor_roles = TENSOR_ROLES

    def summary(self, config: LoraConfig) -> str:
        return (f"lora r={config.rank} alpha={config.alpha:g} on {','.join(config.targets)}"
                + (" (rsLoRA)" if config.use_rslora else ""))

    def adapter_off(self, manifest, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """B = 0 (A as given): the update scaling * B @ A vanishes, so every adapted layer is its base layer."""
        return {t.graph_name: np.zeros(t.shape, np.float32) if self.role(t) == "lora_B"
                else np.array(adapter[t.graph_name], dtype=np.float32)
                for t in self.trainable(manifest)}

    def weight_delta(self, config: LoraConfig, layer: dict[str, np.ndarray]) -> np.ndarray:
        """W' = W + scaling * B @ A: (out, r) @ (r, in) -> (out, in)."""
        return config.scaling * (layer["lora_B"] @ layer["lora_A"])

    def folder_key(self, key: str) -> str:
        """PEFT saves without the adapter name; accept ``...lora_A.default.weight`` too."""
        return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")

    def folder_config_problems(self, config: dict, manifest) -> list[str]:
        ours = manifest.method["config"]
        problems = []
        if str(config.get("peft_type", "")).upper() != "LORA":
            return [f"peft_type is {config.get('peft_type')!r}, the bundle's method is 'lora'"]
        for theirs_key, ours_key in _PEFT_FIELDS.items():
            theirs = config.get(theirs_key, False if ours_key == "use_rslora" else None)
            if theirs != ours[ours_key] and not (isinstance(theirs, (int, float)) and float(theirs) == float(ours[ours_key])):
                problems.append(f"{theirs_key} is {theirs!r}, the bundle's is {ours[ours_key]!r}")
        targets = config.get("target_modules") or []
        if sorted(targets) != sorted(ours["targets"]):
            problems.append(f"target_modules are {sorted(targets)}, the bundle's are {sorted(ours['targets'])}")
        return problems

    def peft_config(self, config: LoraConfig, base_model: str) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": config.rank,
            "lora_alpha": config.alpha,
            "lora_dropout": 0.0,
            "target_modules": sorted(config.targets),
            "use_rslora": config.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }


LORA = LoraSpec()
