"""The torch layers of the adaptation methods: one module per method.

Everything a method is apart from torch (config, tensor roles, adapter off, merge, PEFT keys,
summary) is its spec in the torch-free registry ``edgetune.methods``; the spec names its module
here (``MethodSpec.layer_module``), which registers itself with ``@register`` on import and supplies
  * ``inject(model, config) -> list[Trainable]``: wraps the target layers of a torch model and
    returns the DECLARED trainable tensors (module path, attribute, PEFT key) — never searched for,
  * ``peft_config(config, base_model) -> dict``: the spec's, for the exporter;
and may supply
  * ``resolve_config(model, config) -> config``: the config with what depends on the model filled in
    (its width, layers, heads), before ``inject``;
  * ``generation_view(model, trainables)``: a context manager yielding the trainables that become
    generation-graph inputs while the model is traced for generation (default: all of them).
"""

from __future__ import annotations

import importlib
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
    """The torch layer of registered method ``name`` (its module is imported on first use)."""
    from edgetune.methods import get_method as get_spec, method_names

    if name not in method_names():
        raise ExportError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}.")
    importlib.import_module(get_spec(name).layer_module)  # importing a method module registers it
    return _REGISTRY[name]

