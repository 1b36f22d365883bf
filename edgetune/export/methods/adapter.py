"""Bottleneck adapters: the torch layer, its injection after attention/MLP blocks, its AdapterHub naming.

Numerics follow AdapterHub ``adapters``' bottleneck adapter in the configuration the spec writes
(``edgetune.methods.adapter``): ``h + up(act(down(h)))`` on the block output h.

- Llama (decoder): h is the output of ``self_attn`` / ``mlp``; the decoder layer adds its residual after.
- BERT (encoder, sequence classification): h is the output of the attention output projection
  (``attention.output.dense``) / the FFN output projection (``output.dense``), i.e. where AdapterHub's
  ``BertSelfOutput``/``BertOutput`` call ``bottleneck_layer_forward``: with ``residual_before_ln=True``,
  ``original_ln_after=True`` that computes ``LayerNorm(h + up(act(down(h))) + x)``, x the block input,
  which is wrapping the dense layer (dropout between dense and adapter is 0 in a bundle).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from edgetune.errors import ExportError
from edgetune.export.methods import Trainable, register
from edgetune.methods.adapter import ADAPTER as SPEC, ENCODER_PLACES, PLACES, TENSOR_ROLES, AdapterConfig

_ACTIVATIONS = {"swish": nn.functional.silu, "relu": nn.functional.relu, "tanh": torch.tanh,
                "gelu": nn.functional.gelu}  # methods.adapter.ACTIVATIONS


class BottleneckAdapter(nn.Module):
    """A frozen block (attention or MLP) followed by a trainable bottleneck on its output.

    adapter_down: (dim, hidden), adapter_down_bias: (dim,), adapter_up: (hidden, dim),
    adapter_up_bias: (hidden,); up and its bias are zero at start, so the wrapped block starts
    equal to the base block. Attention blocks return a tuple: the adapter acts on its first item.
    """

    adapter_tensor_names = TENSOR_ROLES  # declared, not searched for (STYLE.md #3)

    def __init__(self, base: nn.Module, hidden: int, dim: int, non_linearity: str):
        super().__init__()
        self.base = base
        self.adapter_down = nn.Parameter(torch.empty(dim, hidden))
        self.adapter_down_bias = nn.Parameter(torch.zeros(dim))
        self.adapter_up = nn.Parameter(torch.zeros(hidden, dim))
        self.adapter_up_bias = nn.Parameter(torch.zeros(hidden))
        self.activation = _ACTIVATIONS[non_linearity]

    @classmethod
    def from_base(cls, base: nn.Module, hidden: int, config: AdapterConfig, generator: torch.Generator):
        layer = cls(base, hidden, config.bottleneck, config.non_linearity)
        bound = 1.0 / math.sqrt(hidden)  # kaiming_uniform_(a=sqrt(5)), as AdapterHub's "mam_adapter" init
        with torch.no_grad():
            layer.adapter_down.uniform_(-bound, bound, generator=generator)
        return layer

    def adapt(self, h: torch.Tensor) -> torch.Tensor:  # (..., hidden) -> (..., hidden)
        down = self.activation(nn.functional.linear(h, self.adapter_down, self.adapter_down_bias))
        return h + nn.functional.linear(down, self.adapter_up, self.adapter_up_bias)

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):  # attention: (output, weights)
            return (self.adapt(out[0]), *out[1:])
        return self.adapt(out)

    def merge(self) -> nn.Module:
        """The base block back (a bottleneck has a non-linearity: it cannot be folded into a weight)."""
        return self.base


class _Adapter:
    name = SPEC.name
    config_class = AdapterConfig

    def resolve_config(self, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        """The config with the model's width filled in (the bottleneck may be hidden / reduction factor)."""
        if not isinstance(config, AdapterConfig):
            raise ExportError(f"method adapter needs an AdapterConfig, got {type(config).__name__}.")
        return dataclasses.replace(config, hidden_size=int(model.config.hidden_size))

    def inject(self, model: nn.Module, config: AdapterConfig) -> list[Trainable]:
        """Wrap the adapted blocks of every layer (decoder: ``model.layers[i].self_attn`` / ``.mlp``;
        BERT encoder: ``bert.encoder.layer[i].attention.output.dense`` / ``.output.dense``); freeze the rest."""
        blocks = _blocks(model, config)
        hidden = int(model.config.hidden_size)
        if config.hidden_size and config.hidden_size != hidden:
            raise ExportError(f"adapter config is for width {config.hidden_size}, the model's is {hidden}.")
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(config.seed)
        declared: list[Trainable] = []
        for path, parent, attr in blocks:
            setattr(parent, attr, BottleneckAdapter.from_base(getattr(parent, attr), hidden, config, generator))
            declared.extend(Trainable(path, role, SPEC.peft_key(path, role)) for role in TENSOR_ROLES)
        return declared

    def peft_config(self, config: AdapterConfig, base_model: str) -> dict:
        return SPEC.peft_config(config, base_model)


def _blocks(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module, str]]:
    """(module path, parent module, attribute) of every block to adapt, attention block first in each
    layer (the order the forward runs them); refuses a model with neither layout."""
    decoder = getattr(getattr(model, "model", None), "layers", None)
    encoder = getattr(getattr(getattr(model, "bert", None), "encoder", None), "layer", None)
    found = []
    if decoder is not None and all(hasattr(layer, PLACES[w]) for layer in decoder for w in config.where):
        for i, layer in enumerate(decoder):
            found += [(f"model.layers.{i}.{PLACES[w]}", layer, PLACES[w]) for w in ("attn", "mlp") if w in config.where]
        return found
    if encoder is not None:
        for i, layer in enumerate(encoder):
            for w in ("attn", "mlp"):
                if w not in config.where:
                    continue
                owner, _, attr = ENCODER_PLACES[w].rpartition(".")  # attention.output + dense
                parent = layer.get_submodule(owner)
                if not isinstance(getattr(parent, attr, None), nn.Linear):
                    raise ExportError(f"method adapter needs a Linear at layer {i}'s {ENCODER_PLACES[w]}; "
                                      f"{type(model).__name__} has none.")
                found.append((f"bert.encoder.layer.{i}.{ENCODER_PLACES[w]}", parent, attr))
        return found
    raise ExportError(f"method adapter needs decoder layers with {', '.join(PLACES[w] for w in config.where)} "
                      f"blocks (model.layers[i]) or a BERT encoder (bert.encoder.layer[i]); "
                      f"{type(model).__name__} has neither.")


ADAPTER = register(_Adapter())
