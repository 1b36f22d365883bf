"""Prefix tuning: the torch layers, their injection into a Llama-style model, PEFT naming.

``PrefixEncoder`` (on the ``*ForCausalLM`` as ``prefix_encoder``) holds the trainable tensors and
produces the (m, L*2*kv_heads*head_dim) table once per forward; each ``PrefixAttention`` wraps one
attention layer and prepends its layer's slice (see ``edgetune.methods.prefix`` for the layout,
the positions and the mask). Numerics follow PEFT's prefix tuning on transformers' eager attention.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from edgetune.errors import ExportError
from edgetune.export.methods import Trainable, register
from edgetune.methods.prefix import MODULE, PREFIX as SPEC, TABLE, PrefixConfig


class PrefixEncoder(nn.Module):
    """The trainable prefix: the table itself, or PEFT's reparameterisation (embedding -> MLP).

    prompt_embeddings: (m, W) with W = L*2*kv_heads*head_dim; or, as PEFT's ``PrefixEncoder`` with
    ``prefix_projection``, embedding (m, D) with D = kv_heads*head_dim (PEFT's token_dim),
    transform_in (H, D) + bias, Tanh, transform_out (W, H) + bias.
    """

    def __init__(self, config: PrefixConfig, generator: torch.Generator):
        super().__init__()
        m, width = config.num_virtual_tokens, config.width
        self.projection = config.projection
        if not config.projection:
            self.prompt_embeddings = nn.Parameter(torch.randn(m, width, generator=generator))  # as nn.Embedding's init
            self.roles = (TABLE,)
        else:
            hidden, proj = config.kv_heads * config.head_dim, config.projection  # PEFT's token_dim
            self.embedding = nn.Parameter(torch.randn(m, hidden, generator=generator))
            self.transform_in = nn.Parameter(torch.empty(proj, hidden))
            self.transform_in_bias = nn.Parameter(torch.empty(proj))
            self.transform_out = nn.Parameter(torch.empty(width, proj))
            self.transform_out_bias = nn.Parameter(torch.empty(width))
            for weight, bias, fan_in in ((self.transform_in, self.transform_in_bias, hidden),
                                         (self.transform_out, self.transform_out_bias, proj)):
                bound = fan_in ** -0.5  # nn.Linear's default init
                with torch.no_grad():
                    weight.uniform_(-bound, bound, generator=generator)
                    bias.uniform_(-bound, bound, generator=generator)
            self.roles = ("embedding", "transform_in", "transform_in_bias", "transform_out", "transform_out_bias")
        self.config = config
        self.enabled = True
        self.current: torch.Tensor | None = None  # the table of the running forward (m, W)
        self.mask: torch.Tensor | None = None  # its additive mask (1, 1, 1, m): 0, or -inf for an all-zero row

    def table(self) -> torch.Tensor:  # (m, W)
        if not self.projection:
            return self.prompt_embeddings
        h = torch.tanh(nn.functional.linear(self.embedding, self.transform_in, self.transform_in_bias))
        return nn.functional.linear(h, self.transform_out, self.transform_out_bias)

    def begin(self) -> None:
        """Compute the table and its mask once for this forward (all layers read them)."""
        table = self.table()
        self.current = table
        live = (table * table).sum(dim=1) > 0  # (m,) a row that is all zero: "adapter off", masked out
        zero = torch.zeros((), dtype=table.dtype)
        self.mask = torch.where(live, zero, torch.tensor(torch.finfo(table.dtype).min))[None, None, None, :]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s prefix key and value, each (kv_heads, m, head_dim)."""
        c = self.config
        grid = self.current.view(c.num_virtual_tokens, c.num_layers * 2, c.kv_heads, c.head_dim)
        return grid[:, 2 * index].transpose(0, 1), grid[:, 2 * index + 1].transpose(0, 1)


class PrefixAttention(nn.Module):
    """A frozen Llama-style attention layer attending to its prefix keys/values first."""

    def __init__(self, base: nn.Module, encoder: PrefixEncoder, index: int):
        super().__init__()
        self.base = base
        self.index = index
        object.__setattr__(self, "encoder", encoder)  # shared, registered once on the model (not a child here)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, cache_position=None,
                **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        if not self.encoder.enabled:
            return self.base(hidden_states, position_embeddings, attention_mask, past_key_values=past_key_values,
                             cache_position=cache_position, **kwargs)
        a = self.base
        shape = hidden_states.shape[:-1]  # (B, T)
        heads = (*shape, -1, a.head_dim)
        q = a.q_proj(hidden_states).view(heads).transpose(1, 2)  # (B, heads, T, hd)
        k = a.k_proj(hidden_states).view(heads).transpose(1, 2)  # (B, kv_heads, T, hd)
        v = a.v_proj(hidden_states).view(heads).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        pk, pv = self.encoder.layer(self.index)  # (kv_heads, m, hd): not rotated, as a cache holds them
        batch = q.shape[0]
        k = torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2)  # (B, kv_heads, m+T, hd)
        v = torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2)
        prefix_mask = self.encoder.mask.expand(attention_mask.shape[0], 1, attention_mask.shape[2], -1)
        mask = torch.cat([prefix_mask, attention_mask], dim=-1)  # (B, 1, T, m+T)
        out, weights = eager_attention_forward(a, q, k, v, mask, scaling=a.scaling, dropout=0.0)
        return a.o_proj(out.reshape(*shape, -1).contiguous()), weights


def _begin_and_shift_positions(encoder: PrefixEncoder):
    """LlamaModel pre-hook: build the prefix table, and number the real tokens m, m+1, ... (as PEFT's cache does)."""

    def hook(module, args, kwargs):
        if not encoder.enabled:
            return args, kwargs
        encoder.begin()
        if kwargs.get("position_ids") is None:
            ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
            kwargs["position_ids"] = (torch.arange(ids.shape[1], device=ids.device) + encoder.config.num_virtual_tokens)[None, :]
        return args, kwargs

    return hook


def _token_prefix(model: nn.Module, config: PrefixConfig, generator: torch.Generator) -> torch.Tensor:
    """(m, L*2*kv*hd): the base model's cached keys/values of m random vocabulary tokens at positions
    0..m-1, so the prefix starts as a real (if random) text before the real tokens at m, m+1, ..."""
    m = config.num_virtual_tokens
    ids = torch.randint(0, model.config.vocab_size, (1, m), generator=generator)
    was_training = model.training
    model.eval()
    cache = model(input_ids=ids, use_cache=True).past_key_values
    model.train(was_training)
    grid = torch.empty(m, config.num_layers * 2, config.kv_heads, config.head_dim)
    for i in range(config.num_layers):
        keys, values = cache[i][0][0], cache[i][1][0]  # (kv_heads, m, head_dim)
        grid[:, 2 * i], grid[:, 2 * i + 1] = keys.transpose(0, 1), values.transpose(0, 1)
    return grid.reshape(m, -1)


class _Prefix:
    name = SPEC.name
    config_class = PrefixConfig

    def resolve_config(self, model: nn.Module, config: PrefixConfig) -> PrefixConfig:
        if not isinstance(config, PrefixConfig):
            raise ExportError(f"method prefix needs a PrefixConfig, got {type(config).__name__}.")
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return dataclasses.replace(config, num_layers=int(c.num_hidden_layers), hidden_size=int(c.hidden_size),
                                   kv_heads=int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads),
                                   head_dim=int(head_dim))

    def inject(self, model: nn.Module, config: PrefixConfig) -> list[Trainable]:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None or not all(hasattr(getattr(layer, "self_attn", None), "q_proj") for layer in layers):
            raise ExportError(f"method prefix needs Llama-style attention layers (model.layers[i].self_attn with "
                              f"q_proj/k_proj/v_proj/o_proj); {type(model).__name__} has none.")
        if len(layers) != config.num_layers:
            raise ExportError(f"prefix config is for {config.num_layers} layers, the model has {len(layers)}.")
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(config.seed)
        encoder = PrefixEncoder(config, generator)
        if config.init == "tokens" and not config.projection:
            with torch.no_grad():
                encoder.prompt_embeddings.copy_(_token_prefix(model, config, generator))
        setattr(model, MODULE, encoder)
        for i, layer in enumerate(layers):
            layer.self_attn = PrefixAttention(layer.self_attn, encoder, i)
        model.model.register_forward_pre_hook(_begin_and_shift_positions(encoder), with_kwargs=True)
        return [Trainable(MODULE, role, SPEC.peft_key(MODULE, role)) for role in encoder.roles]

    @contextlib.contextmanager
    def generation_view(self, model: nn.Module, trainables: list[Trainable]):
        """The generation graph is the base decoder: the prefix arrives as its initial key/value cache
        (``PrefixSpec.initial_past``), so no adapter tensor is a graph input."""
        encoder = getattr(model, MODULE)
        encoder.enabled = False
        try:
            yield []
        finally:
            encoder.enabled = True

    def peft_config(self, config: PrefixConfig, base_model: str) -> dict:
        return SPEC.peft_config(config, base_model)


PREFIX = register(_Prefix())
