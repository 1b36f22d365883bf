"""The method registry: one torch-free spec per adaptation method, by name.

A spec says everything the device half, the delta tools and the CLI need to know about a method
without torch: its config class (a dataclass that checks itself), its trainable tensors (declared
in the bundle's manifest by the exporter), what "adapter off" means, how it merges into a base
weight, how its keys map to PEFT, and its one-line summary. The torch layer of a method lives in
``edgetune.export.methods.<name>`` (named by ``MethodSpec.layer_module``).

Adding a method: a torch module in ``edgetune/export/methods/`` plus its spec registered below.
"""

from __future__ import annotations

from edgetune.errors import EdgetuneError
from edgetune.methods.adapter import ADAPTER, AdapterConfig
from edgetune.methods.base import CliOption, MethodConfig, MethodSpec
from edgetune.methods.full import FULL, FullConfig
from edgetune.methods.lora import LORA, LoraConfig
from edgetune.methods.prefix import PREFIX, PrefixConfig

_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    _REGISTRY[spec.name] = spec
    return spec


register_method(LORA)
register_method(ADAPTER)
register_method(PREFIX)
register_method(FULL)


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; EdgetuneError naming the known methods otherwise."""
    if name not in _REGISTRY:
        raise EdgetuneError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}.")
    return _REGISTRY[name]


def config_from_dict(name: str, d: dict) -> MethodConfig:
    """Method ``name``'s config from a manifest or delta dict; unknown keys are refused by name."""
    return get_method(name).config_class.from_dict(d)


def cli_options() -> list[CliOption]:
    """Every method's command-line options, one per flag (methods sharing a field share the flag)."""
    by_flag: dict[str, CliOption] = {}
    for name in method_names():
        for option in _REGISTRY[name].config_class.cli_options():
            known = by_flag.get(option.flag)
            by_flag[option.flag] = option if known is None else known.shared_with(option)
    return list(by_flag.values())


__all__ = ["AdapterConfig", "CliOption", "FullConfig", "LoraConfig", "MethodConfig", "MethodSpec", "cli_options",
           "config_from_dict", "get_method", "method_names", "PrefixConfig", "register_method"]
