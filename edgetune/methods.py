"""Method configs: plain dataclasses that check themselves, shared by exporter and device.

They hold no torch code, so the runtime and the delta tools can read a bundle's method config.
The torch layers live in ``edgetune.export.methods``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from edgetune.errors import EdgetuneError


@dataclass
class LoraConfig:
    """Low-rank adaptation: W x + scaling * B (A x), A: (rank, in), B: (out, rank)."""

    rank: int = field(default=8, metadata={"help": "rank r of A (r x in) and B (out x r)"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: scaling = alpha / r"})
    targets: tuple[str, ...] = field(
        default=("q_proj", "v_proj"), metadata={"help": "names of the linear layers to adapt"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (only 0 is exported)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised: scaling = alpha / sqrt(r)"})
    seed: int = field(default=0, metadata={"help": "seed for the initial A (Kaiming-uniform, as PEFT)"})

    name = "lora"

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise EdgetuneError(f"`rank` must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise EdgetuneError(f"`alpha` must be positive, got {self.alpha!r}.")
        if not self.targets or any(not t for t in self.targets):
            raise EdgetuneError(f"`targets` must name at least one module, got {self.targets!r}.")
        if self.dropout != 0.0:
            raise EdgetuneError(
                f"`dropout` must be 0 for an exported training graph, got {self.dropout!r}; "
                "drop the option."
            )

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


METHOD_CONFIGS = {"lora": LoraConfig}


def config_from_dict(name: str, d: dict):
    if name not in METHOD_CONFIGS:
        raise EdgetuneError(f"unknown method {name!r}; known: {', '.join(METHOD_CONFIGS)}.")
    return METHOD_CONFIGS[name].from_dict(d)
