"""The method registry: one module per adaptation method (STYLE.md #1).

A method module registers itself with ``@register``. The exporter asks the registry for the
method by name; each method supplies
  * a config dataclass that checks itself (lives in ``edgetune.methods`` so the device side can
    read it without torch),
  * ``inject(model, config) -> list[Trainable]``: wraps the target layers of a torch model and
    returns the DECLARED trainable tensors (module path, attribute, PEFT key) — never searched for,
  * ``peft_config(config, base_model) -> dict``: the ``adapter_config.json`` PEFT expects.

Bottleneck adapters, prefix tuning and full fine-tuning slot in as further modules here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edgetune.errors import ExportError


@dataclass(frozen=True)
class Trainable:
    """One trainable tensor, declared by its method.

    ``module_path`` is the dotted path inside the Hugging Face model (``model.layers.0.self_attn.q_proj``),
    ``attr`` the parameter's attribute on the wrapping layer (``lora_A``), ``peft_key`` the key
    PEFT saves it under (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).
    """

    module_path: str
    attr: str
    peft_key: str

    @property
    def torch_name(self) -> str:
        return f"{self.module_path}.{self.attr}"


class Method(Protocol):
    name: str

    def inject(self, model, config) -> list[Trainable]: ...

    def peft_config(self, config, base_model: str) -> dict: ...


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise ExportError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def _load_builtin() -> None:
    # Importing a method module registers it; order does not matter.
    from edgetune.export.methods import lora  # noqa: F401

