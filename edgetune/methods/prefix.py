"""Prefix tuning's config and spec (no torch).

Every attention layer i attends to m trainable key/value vectors before the real tokens:

    keys_i = [P_key_i ; rotary(K x)],  values_i = [P_value_i ; V x]      P_*_i: (kv_heads, m, head_dim)

with the attention mask extended by m always-visible columns. The prefix vectors are not rotated
(they are what a key/value cache would hold), and the real tokens keep consecutive positions
counted after the m virtual tokens (m, m+1, ...), as PEFT numbers them (its cache holds the prefix),
so a PEFT prefix-tuning adapter gives the same logits.

The trainable tensor is PEFT's ``prompt_embeddings`` (m, num_layers * 2 * kv_heads * head_dim): row t
is virtual token t, its columns layer-major, then key/value, then heads, then head_dim (PEFT's
``view(m, L*2, kv_heads, head_dim)``). With ``--prefix-projection H`` the training graph holds
PEFT's reparameterisation instead, an embedding (m, kv*hd) and an MLP kv*hd -> H -> L*2*kv*hd
(Linear, Tanh, Linear); it is folded into ``prompt_embeddings`` for deltas, PEFT and generation.

For generation the prefix is the decoder's initial key/value cache (no graph inputs). "Adapter off":
all-zero vectors; a virtual token whose row of the table is all zero is masked out of every
attention layer (the training graph computes that mask; generation leaves it out of the cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgetune.errors import DeltaError
from edgetune.methods.base import MethodConfig, MethodSpec

TABLE = "prompt_embeddings"  # PEFT's key and our trainable's role without projection
PROJECTION_ROLES = ("embedding", "transform_in", "transform_in_bias", "transform_out", "transform_out_bias")
TENSOR_ROLES = (TABLE, *PROJECTION_ROLES)
MODULE = "prefix_encoder"  # the torch module on the *ForCausalLM holding the trainable tensors


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class PrefixConfig(MethodConfig):
    """Prefix tuning: m trainable key/value vectors per layer, prepended in every attention layer."""

    num_virtual_tokens: int = field(default=16, metadata={
        "help": "Virtual tokens m: key/value vectors prepended in every attention layer.", "cli": "--num-virtual-tokens"})
    projection: int = field(default=0, metadata={
        "help": "Train through PEFT's reparameterisation MLP of this hidden size (0: train the vectors directly); "
                "folded into plain vectors for deltas and generation.", "cli": "--prefix-projection"})
    seed: int = field(default=0, metadata={"help": "Seed for the initial prefix.", "cli": "--seed"})
    init: str = field(default="tokens", metadata={
        "help": "tokens: the base model's own keys/values of m random vocabulary tokens (without projection), so the "
                "prefix starts as a short real text; random: normal(0, 1) vectors, as PEFT's embedding.",
        "cli": "--prefix-init", "choices": ("tokens", "random")})
    num_layers: int = field(default=0, metadata={"help": "Filled in by the exporter: the model's layers."})
    kv_heads: int = field(default=0, metadata={"help": "Filled in by the exporter: key/value heads."})
    head_dim: int = field(default=0, metadata={"help": "Filled in by the exporter: head size."})
    hidden_size: int = field(default=0, metadata={"help": "Filled in by the exporter: the model's width."})

    name = "prefix"

    def problems(self) -> list[str]:
        problems = []
        if not _is_int(self.num_virtual_tokens) or not 1 <= self.num_virtual_tokens <= 1024:
            problems.append(f"`num_virtual_tokens` (--num-virtual-tokens) must be between 1 and 1024, got {self.num_virtual_tokens!r}")
        if not _is_int(self.projection) or self.projection < 0:
            problems.append(f"`projection` (--prefix-projection) must be 0 or a positive hidden size, got {self.projection!r}")
        if self.init not in ("tokens", "random"):
            problems.append(f"`init` must be 'tokens' or 'random', got {self.init!r}")
        for key in ("seed", "num_layers", "kv_heads", "head_dim", "hidden_size"):
            value = getattr(self, key)
            if not _is_int(value) or (key != "seed" and value < 0):
                problems.append(f"`{key}` must be a non-negative integer, got {value!r}")
        return problems

    @property
    def width(self) -> int:
        """Columns of the folded table: num_layers * 2 * kv_heads * head_dim."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim


def fold(config: PrefixConfig, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The (m, L*2*kv*hd) table from the trainable tensors by role: as is, or the MLP applied to the embedding."""
    if not config.projection:
        return np.asarray(tensors[TABLE], np.float32)
    h = np.tanh(tensors["embedding"] @ tensors["transform_in"].T + tensors["transform_in_bias"])  # (m, H)
    return (h @ tensors["transform_out"].T + tensors["transform_out_bias"]).astype(np.float32)  # (m, L*2*kv*hd)


def per_layer(config: PrefixConfig, table: np.ndarray) -> list[np.ndarray]:
    """(m, L*2*kv*hd) -> [layer 0 key, layer 0 value, layer 1 key, ...], each (kv_heads, m, head_dim)."""
    m = table.shape[0]
    grid = table.reshape(m, config.num_layers * 2, config.kv_heads, config.head_dim)
    return [np.ascontiguousarray(grid[:, j].transpose(1, 0, 2)) for j in range(config.num_layers * 2)]


class PrefixSpec(MethodSpec):
    name = "prefix"
    packs = False  # real tokens sit at positions m, m+1, … (as PEFT); a packed row's position_ids would reset them
    config_class = PrefixConfig
    description = "prefix tuning: trainable key/value vectors in every attention layer"
    layer_module = "edgetune.export.methods.prefix"
    tensor_roles = TENSOR_ROLES

    def summary(self, config: PrefixConfig) -> str:
        return (f"prefix m={config.num_virtual_tokens} in {config.num_layers} layers"
                + (f" (trained through a {config.projection}-wide MLP)" if config.projection else ""))

    def adapter_off(self, manifest, adapter: dict[str, np.ndarray], base=None) -> dict[str, np.ndarray]:
        """All zero: every virtual token is then masked out, so each attention layer is its base layer
        (with the projection, the output bias and weight are zero too, so the folded table is zero)."""
        return {t.graph_name: np.zeros(t.shape, np.float32) for t in self.trainable(manifest)}

    def table(self, manifest, adapter: dict[str, np.ndarray]) -> np.ndarray:
        """The folded (m, L*2*kv*hd) table from ``adapter`` by graph name."""
        return fold(self.config(manifest), {self.role(t): adapter[t.graph_name] for t in self.trainable(manifest)})

    def initial_past(self, manifest, adapter: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The generation graph's initial cache: per layer key and value, (1, kv_heads, m', head_dim),
        m' = the virtual tokens whose row is not all zero (those the training graph does not mask out)."""
        config = self.config(manifest)
        table = self.table(manifest, adapter)
        live = table[np.abs(table).sum(axis=1) > 0]  # (m', L*2*kv*hd)
        return [p[None] for p in per_layer(config, live)]

    # --- deltas and PEFT carry the folded table ------------------------------------------------------
    def peft_key(self, module_path: str, role: str) -> str:
        return TABLE if role == TABLE else f"{module_path}.{role}"

    def peft_config(self, config: PrefixConfig, base_model: str) -> dict:
        """PEFT's ``PrefixTuningConfig`` for the folded table (``token_dim`` = kv_heads * head_dim, as
        PEFT sets it for grouped-query attention)."""
        return {
            "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "num_virtual_tokens": config.num_virtual_tokens, "num_layers": config.num_layers,
            "token_dim": config.kv_heads * config.head_dim, "num_attention_heads": config.kv_heads,
            "num_transformer_submodules": 1, "encoder_hidden_size": config.kv_heads * config.head_dim,
            "prefix_projection": False, "inference_mode": True, "revision": None, "modules_to_save": None,
        }

    def folder_config_problems(self, config: dict, manifest) -> list[str]:
        ours = manifest.method["peft_config"]
        if str(config.get("peft_type", "")).upper() != "PREFIX_TUNING":
            return [f"peft_type is {config.get('peft_type')!r}, the bundle's method is 'prefix'"]
        return [f"{key} is {config.get(key)!r}, the bundle's is {ours[key]!r}"
                for key in ("num_virtual_tokens", "num_layers", "token_dim") if config.get(key) != ours[key]]

    def folder_tensors(self, manifest, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Trainable tensors by peft key -> PEFT's one ``prompt_embeddings`` (the projection folded)."""
        by_role = {self.role(t): tensors[t.peft_key] for t in self.trainable(manifest)}
        return {TABLE: fold(self.config(manifest), by_role)}

    def folder_shapes(self, manifest) -> dict[str, tuple]:
        config = self.config(manifest)
        return {TABLE: (config.num_virtual_tokens, config.width)}

    def from_folder_tensors(self, manifest, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.config(manifest).projection:
            raise DeltaError("this bundle trains the prefix through a reparameterisation MLP, which a folded PEFT "
                             "prefix cannot be turned back into; export the bundle without --prefix-projection "
                             "to start from a PEFT prefix.")
        return dict(tensors)


PREFIX = PrefixSpec()
