"""LoRA's config and spec (no torch): W x + scaling * B (A x), A: (rank, in), B: (out, rank).

The torch layer is ``edgetune.export.methods.lora.LoraLinear``. Targets, per-module ranks and
alphas follow PEFT's ``LoraConfig`` (``target_modules="all-linear"``, ``rank_pattern``,
``alpha_pattern``), so the ``adapter_config.json`` written for a bundle means the same to PEFT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from numbers import Real

import numpy as np

from edgetune.methods.base import MethodConfig, MethodSpec, head_tensors

TENSOR_ROLES = ("lora_A", "lora_B")  # declared once: the torch layer's parameters and the manifest's tensors
ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND: every linear layer but the output head


def pattern_key(keys, module_path: str) -> str | None:
    """The first pattern key matching ``module_path``, as PEFT's ``get_pattern_key`` matches them.

    A key is a regular expression that must match the whole path or a dotted suffix of it:
    ``down_proj`` matches ``model.layers.3.mlp.down_proj``, ``layers\\.1\\..*_proj`` matches every
    projection of layer 1. Order matters: the first key that matches wins.
    """
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def _pattern_problems(name: str, pattern, positive) -> list[str]:
    """Every problem with a ``{module pattern: number}`` mapping."""
    if not isinstance(pattern, dict):
        return [f"`{name}` must map module patterns to numbers, got {pattern!r}"]
    problems = []
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            problems.append(f"`{name}` keys must be module names or patterns, got {key!r}")
            continue
        try:
            re.compile(key)
        except re.error as exc:
            problems.append(f"`{name}` key {key!r} is not a regular expression ({exc})")
        if not positive(value):
            problems.append(f"`{name}` value for {key!r} must be positive, got {value!r}")
    return problems


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
        metadata={"help": "Comma-separated names of the linear layers to adapt, or all-linear (every linear "
                          "layer but the LM head, as PEFT means it).", "cli": "--targets"},
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-module ranks, e.g. 'down_proj=16,o_proj=4' (PEFT's rank_pattern: a key is a regex "
                          "matched against the end of the module path; the first matching key wins).",
                  "cli": "--rank-pattern"},
    )
    alpha_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-module alphas, e.g. 'down_proj=32' (PEFT's alpha_pattern, matched like --rank-pattern).",
                  "cli": "--alpha-pattern"},
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
        elif ALL_LINEAR in self.targets and len(self.targets) > 1:
            problems.append(f"`targets` {ALL_LINEAR} already names every linear layer; give it alone, got {self.targets!r}")
        problems += _pattern_problems("rank_pattern", self.rank_pattern, lambda v: _is_int(v) and v > 0)
        problems += _pattern_problems("alpha_pattern", self.alpha_pattern, lambda v: _is_real(v) and v > 0)
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

    @property
    def all_linear(self) -> bool:
        return self.targets == (ALL_LINEAR,)

    def rank_of(self, module_path: str) -> int:
        """The rank of the layer at ``module_path`` (``rank_pattern`` first, as PEFT)."""
        key = pattern_key(self.rank_pattern, module_path)
        return self.rank if key is None else self.rank_pattern[key]

    def alpha_of(self, module_path: str) -> float:
        key = pattern_key(self.alpha_pattern, module_path)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scaling_of(self, module_path: str) -> float:
        """alpha / r (rsLoRA: alpha / sqrt(r)) of one layer, with its pattern rank and alpha."""
        rank, alpha = self.rank_of(module_path), self.alpha_of(module_path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


class LoraSpec(MethodSpec):
    name = "lora"
    config_class = LoraConfig
    layer_module = "edgetune.export.methods.lora"
    tensor_roles = TENSOR_ROLES
    description = "low-rank A, B beside the chosen linear layers (PEFT LoRA)"

    def summary(self, config: LoraConfig) -> str:
        patterns = "".join(f"; {name} " + ",".join(f"{k}={v:g}" for k, v in pattern.items())
                           for name, pattern in (("ranks", config.rank_pattern), ("alphas", config.alpha_pattern)) if pattern)
        return (f"lora r={config.rank} alpha={config.alpha:g} on {','.join(config.targets)}"
                + (" (rsLoRA)" if config.use_rslora else "") + patterns)

    def adapter_off(self, manifest, adapter: dict[str, np.ndarray], base=None) -> dict[str, np.ndarray]:
        """B = 0 (A as given): the update scaling * B @ A vanishes, so every adapted layer is its base layer."""
        return {t.graph_name: np.zeros(t.shape, np.float32) if self.role(t) == "lora_B"
                else np.array(adapter[t.graph_name], dtype=np.float32)
                for t in self.trainable(manifest)}

    def weight_delta(self, config: LoraConfig, layer: dict[str, np.ndarray], module_path: str = "") -> np.ndarray:
        """W' = W + scaling * B @ A: (out, r) @ (r, in) -> (out, in); scaling of ``module_path``'s patterns."""
        return config.scaling_of(module_path) * (layer["lora_B"] @ layer["lora_A"])

    def folder_key(self, key: str) -> str:
        """PEFT saves without the adapter name; accept ``...lora_A.default.weight`` too."""
        return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")

    def folder_config_problems(self, config: dict, manifest) -> list[str]:
        if str(config.get("peft_type", "")).upper() != "LORA":
            return [f"peft_type is {config.get('peft_type')!r}, the bundle's method is 'lora'"]
        head = head_tensors(manifest)
        problems = peft_config_problems(config, self.config(manifest),
                                        [t.peft_key for t in manifest.trainable if t.graph_name not in head])
        wanted = (manifest.task_config or {}).get("head")
        if head and wanted not in (config.get("modules_to_save") or []):
            problems.append(f"modules_to_save is {config.get('modules_to_save')!r}; the bundle trains its {wanted!r} "
                            "head whole, so it must be listed there")
        return problems

    def peft_config(self, config: LoraConfig, base_model: str) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": config.rank,
            "lora_alpha": config.alpha,
            "lora_dropout": 0.0,
            "target_modules": ALL_LINEAR if config.all_linear else sorted(config.targets),
            "rank_pattern": dict(config.rank_pattern),
            "alpha_pattern": dict(config.alpha_pattern),
            "use_rslora": config.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }


LORA = LoraSpec()


def _module_of(peft_key: str) -> str:
    """``base_model.model.<module>.lora_A.weight`` (``LoraSpec.peft_key``) -> ``<module>``."""
    return peft_key.removeprefix("base_model.model.").rsplit(".", 2)[0]


def _targeted(target_modules, module: str) -> bool:
    """Does PEFT's ``target_modules`` select ``module`` (``check_target_module_exists``'s rules)?"""
    if isinstance(target_modules, str):
        return target_modules == ALL_LINEAR or re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in target_modules or ())


def peft_config_problems(peft: dict, config: LoraConfig, peft_keys: list[str]) -> list[str]:
    """How a PEFT ``adapter_config.json`` disagrees with the bundle's LoRA, layer by layer.

    Ranks show in the tensor shapes (checked by the reader); here: rsLoRA, every adapted layer
    selected by PEFT's ``target_modules``, and each layer's alpha under both configs' patterns.
    """
    problems = []
    if bool(peft.get("use_rslora", False)) != config.use_rslora:
        problems.append(f"use_rslora is {peft.get('use_rslora')!r}, the bundle's is {config.use_rslora!r}")
    modules = sorted({_module_of(k) for k in peft_keys})
    targets = peft.get("target_modules")
    outside = [m for m in modules if not _targeted(targets, m)]
    if outside:
        problems.append(f"target_modules {targets!r} do not select {', '.join(outside[:3])}, which the bundle adapts")
    r, alpha = peft.get("r", 8), peft.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = peft.get("rank_pattern") or {}, peft.get("alpha_pattern") or {}
    for module in modules:
        key_r, key_a = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
        theirs = (rank_pattern[key_r] if key_r else r, alpha_pattern[key_a] if key_a else alpha)
        ours = (config.rank_of(module), config.alpha_of(module))
        if not all(isinstance(v, (int, float)) and float(v) == float(o) for v, o in zip(theirs, ours)):
            problems.append(f"{module} has r={theirs[0]!r} lora_alpha={theirs[1]!r}, the bundle's are "
                            f"r={ours[0]} lora_alpha={ours[1]:g}")
            break
    return problems
