"""Bottleneck adapters' config and spec (no torch), Houlsby placement.

After the attention and/or MLP block of every decoder layer, on the block's output h (hidden):

    h' = h + up(act(down(h)))       down: (dim, hidden) + bias (dim,), up: (hidden, dim) + bias (hidden,)

and the decoder layer then adds its residual as usual (x + h'). ``up`` and its bias start at zero,
so step 0 is the base model, and "adapter off" is up = 0.

This is AdapterHub ``adapters``' bottleneck adapter with ``mh_adapter`` (after attention) /
``output_adapter`` (after the MLP), ``original_ln_before=False``, ``original_ln_after=True``,
``residual_before_ln=True``, no adapter layer norms, scaling 1: for Llama (no layer norm passed to the
adapter) it computes exactly the formula above, so ``to-peft`` writes a folder that
``model.load_adapter(folder, use_safetensors=True)`` loads (``adapter_config.json`` + ``adapter.safetensors``,
keys ``model.layers.{i}.{attention,output}_adapters.adapters.<name>.adapter_{down.0,up}.{weight,bias}``).
The torch layer is ``edgetune.export.methods.adapter.BottleneckAdapter``.

On a BERT encoder (``--task sequence-classification``) the same adapter sits where AdapterHub's BERT
puts it: on the output of the attention output projection (``attention.output.dense``) and of the FFN
output projection (``output.dense``), before their residual LayerNorm: ``LN(h + up(act(down(h))) + x)``.
Its keys are AdapterHub's for ``BertForSequenceClassification``
(``bert.encoder.layer.{i}.{attention.output,output}.adapters.edgetune.adapter_{down.0,up}.{weight,bias}``),
and ``to-peft`` writes what ``model.save_adapter(folder, name, with_head=True, use_safetensors=True)``
writes for a ``BertForSequenceClassification`` (a static head): the adapter files plus
``head_config.json`` and ``model_head.safetensors`` (``classifier.{weight,bias}``), which
``model.load_adapter(folder, use_safetensors=True, set_active=True)`` loads with the head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from edgetune.methods.base import MethodConfig, MethodSpec

TENSOR_ROLES = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")  # the torch layer's parameters
PLACES = {"attn": "self_attn", "mlp": "mlp"}  # --adapter-where name -> the decoder layer's block attribute
# --adapter-where name -> the BERT layer's projection whose output the adapter takes (AdapterHub's
# mh_adapter in BertSelfOutput, output_adapter in BertOutput)
ENCODER_PLACES = {"attn": "attention.output.dense", "mlp": "output.dense"}
# AdapterHub's names (transformers' get_activation): swish = SiLU, gelu = the exact (erf) GELU. Each
# has a gradient the portable graph's rules cover (SiLU -> QuickGeluGrad, ReluGrad, TanhGrad, GeluGrad).
ACTIVATIONS = ("swish", "relu", "tanh", "gelu")
DEFAULT_DIM = 16  # when neither --adapter-dim nor --reduction-factor is given
ADAPTERHUB_NAME = "edgetune"  # the adapter name inside the AdapterHub keys and config
# AdapterHub keys of the four roles, under model.layers.{i}.{attention,output}_adapters.adapters.<name>.
_HUB_ROLE = {"adapter_down": "adapter_down.0.weight", "adapter_down_bias": "adapter_down.0.bias",
             "adapter_up": "adapter_up.weight", "adapter_up_bias": "adapter_up.bias"}
_HUB_PLACE = {"self_attn": "attention_adapters", "mlp": "output_adapters"}
_HUB_KEY = re.compile(r"^(?P<layers>.+)\.(?P<place>attention_adapters|output_adapters)\.adapters\.[^.]+\.(?P<role>.+)$")
_HUB_BERT_KEY = re.compile(r"^(?P<block>bert\.encoder\.layer\.\d+\.(?:attention\.output|output))\.adapters\.[^.]+\.(?P<role>.+)$")
CLASSIFICATION = "sequence-classification"
# AdapterHub's static-head files (save_adapter(..., with_head=True) on BertForSequenceClassification)
HEAD_CONFIG, HEAD_WEIGHTS = "head_config.json", "model_head.safetensors"
_HEAD_PEFT_PREFIX = "base_model.model."  # the manifest's head keys: base_model.model.classifier.weight


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapters after the attention and/or MLP block of each layer."""

    dim: int = field(default=0, metadata={
        "help": f"Bottleneck size (down-projection width); 0: hidden / --reduction-factor, or {DEFAULT_DIM} if neither is given.",
        "cli": "--adapter-dim"})
    reduction_factor: int = field(default=0, metadata={
        "help": "Bottleneck size as hidden size / this factor (instead of --adapter-dim).", "cli": "--reduction-factor"})
    where: tuple[str, ...] = field(default=("mlp", "attn"), metadata={
        "help": "Comma-separated blocks to adapt: mlp, attn.", "cli": "--adapter-where"})
    non_linearity: str = field(default="swish", metadata={
        "help": "Activation between the projections (AdapterHub's names; swish = SiLU).",
        "cli": "--adapter-non-linearity", "choices": ACTIVATIONS})
    seed: int = field(default=0, metadata={"help": "Seed for the initial trainable tensors (lora: A; adapter: down-projections; prefix: the vectors).", "cli": "--seed"})
    hidden_size: int = field(default=0, metadata={"help": "The model's width; the exporter fills it in (0: not yet known)."})

    name = "adapter"

    def __post_init__(self) -> None:
        if isinstance(self.where, (list, tuple)):
            self.where = tuple(self.where)
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = []
        if not _is_int(self.dim) or self.dim < 0:
            problems.append(f"`dim` (--adapter-dim) must be a positive integer, got {self.dim!r}")
        if not _is_int(self.reduction_factor) or self.reduction_factor < 0:
            problems.append(f"`reduction_factor` (--reduction-factor) must be a positive integer, got {self.reduction_factor!r}")
        elif _is_int(self.dim) and self.dim and self.reduction_factor:
            problems.append("give --adapter-dim or --reduction-factor, not both")
        if (not isinstance(self.where, tuple) or not self.where or len(set(self.where)) != len(self.where)
                or any(w not in PLACES for w in self.where)):
            problems.append(f"`where` (--adapter-where) must list blocks among {', '.join(PLACES)}, got {self.where!r}")
        if self.non_linearity not in ACTIVATIONS:
            problems.append(f"`non_linearity` must be one of {', '.join(ACTIVATIONS)}, got {self.non_linearity!r}")
        if not _is_int(self.seed):
            problems.append(f"`seed` must be an integer, got {self.seed!r}")
        if not _is_int(self.hidden_size) or self.hidden_size < 0:
            problems.append(f"`hidden_size` must be a non-negative integer, got {self.hidden_size!r}")
        return problems

    @property
    def bottleneck(self) -> int:
        """The down-projection width (``hidden_size`` must be known when a reduction factor sets it)."""
        if self.dim:
            return self.dim
        if self.reduction_factor:
            return max(1, self.hidden_size // self.reduction_factor)
        return DEFAULT_DIM


class AdapterSpec(MethodSpec):
    name = "adapter"
    config_class = AdapterConfig
    description = "bottleneck adapters after the attention and/or MLP block (Houlsby)"
    layer_module = "edgetune.export.methods.adapter"
    tensor_roles = TENSOR_ROLES
    ecosystem = "AdapterHub adapters"
    folder_weights = "adapter.safetensors"
    folder_load_hint = "adapters.init(model); model.load_adapter({folder!r}, use_safetensors=True, set_active=True)"

    def summary(self, config: AdapterConfig) -> str:
        return f"adapter dim={config.bottleneck} ({config.non_linearity}) after {','.join(config.where)}"

    def adapter_off(self, manifest, adapter: dict[str, np.ndarray], base=None) -> dict[str, np.ndarray]:
        """up = 0 and its bias = 0 (down as given): every adapter adds zero, so each block is its base block."""
        return {t.graph_name: np.zeros(t.shape, np.float32) if self.role(t).startswith("adapter_up")
                else np.array(adapter[t.graph_name], dtype=np.float32)
                for t in self.trainable(manifest)}

    def peft_key(self, module_path: str, role: str) -> str:
        """``model.layers.0.self_attn`` + ``adapter_down`` -> AdapterHub's
        ``model.layers.0.attention_adapters.adapters.edgetune.adapter_down.0.weight``."""
        layers, _, block = module_path.rpartition(".")
        if block == "dense":  # BERT: bert.encoder.layer.0.attention.output.dense -> ...attention.output.adapters...
            return f"{layers}.adapters.{ADAPTERHUB_NAME}.{_HUB_ROLE[role]}"
        return f"{layers}.{_HUB_PLACE[block]}.adapters.{ADAPTERHUB_NAME}.{_HUB_ROLE[role]}"

    def task_peft_config(self, peft_config: dict, task: str, head: str) -> dict:
        """A classifier's adapters: AdapterHub's config names BertForSequenceClassification (no PEFT task keys)."""
        if task == "sequence-classification":
            return {**peft_config, "model_class": "BertForSequenceClassification", "model_type": "bert"}
        return peft_config

    def folder_key(self, key: str) -> str:
        """An AdapterHub key saved under any adapter name -> the name edgetune's keys use; a static
        head's ``classifier.weight`` -> the manifest's ``base_model.model.classifier.weight``."""
        m = _HUB_KEY.match(key)
        if m:
            return f"{m['layers']}.{m['place']}.adapters.{ADAPTERHUB_NAME}.{m['role']}"
        m = _HUB_BERT_KEY.match(key)
        if m:
            return f"{m['block']}.adapters.{ADAPTERHUB_NAME}.{m['role']}"
        return _HEAD_PEFT_PREFIX + key if key.startswith("classifier.") else key

    # A classifier's folder: the adapters in adapter.safetensors, the head as AdapterHub saves a static head.
    def folder_weight_files(self, manifest, tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        if manifest.task != CLASSIFICATION:
            return {self.folder_weights: tensors}
        head = {k[len(_HEAD_PEFT_PREFIX):]: v for k, v in tensors.items() if k.startswith(_HEAD_PEFT_PREFIX)}
        return {self.folder_weights: {k: v for k, v in tensors.items() if not k.startswith(_HEAD_PEFT_PREFIX)},
                HEAD_WEIGHTS: head}

    def folder_weight_names(self, manifest) -> list[str]:
        return [self.folder_weights, HEAD_WEIGHTS] if manifest.task == CLASSIFICATION else [self.folder_weights]

    def folder_extra_configs(self, manifest) -> dict[str, dict]:
        """``head_config.json`` as AdapterHub writes it for a static head (labels in index order)."""
        if manifest.task != CLASSIFICATION:
            return {}
        labels = list(manifest.task_config["labels"])
        peft = manifest.method["peft_config"]
        return {HEAD_CONFIG: {"config": None, "hidden_size": peft["hidden_size"],
                              "label2id": {name: i for i, name in enumerate(labels)},
                              "model_class": peft["model_class"], "model_name": peft["model_name"],
                              "model_type": peft["model_type"], "name": None, "num_labels": len(labels),
                              "version": peft["version"]}}

    def folder_save_hint(self, manifest) -> str:
        return ": model.save_adapter(folder, name, with_head=True, use_safetensors=True)" if manifest.task == CLASSIFICATION else ""

    def peft_config(self, config: AdapterConfig, base_model: str) -> dict:
        """AdapterHub's ``adapter_config.json`` as ``save_adapter`` writes it (Llama, the exported width)."""
        return {
            "config": {
                "architecture": None, "mh_adapter": "attn" in config.where, "output_adapter": "mlp" in config.where,
                "reduction_factor": config.hidden_size / config.bottleneck,  # AdapterHub: dim = int(hidden // factor)
                "non_linearity": config.non_linearity, "original_ln_before": False, "original_ln_after": True,
                "residual_before_ln": True, "adapter_residual_before_ln": False, "ln_before": False, "ln_after": False,
                "init_weights": "mam_adapter", "is_parallel": False, "scaling": 1.0, "use_gating": False,
                "dropout": 0.0, "phm_layer": False, "leave_out": [], "stochastic_depth": 0.0,
            },
            "hidden_size": config.hidden_size, "model_class": "LlamaForCausalLM", "model_name": base_model,
            "model_type": "llama", "name": ADAPTERHUB_NAME,
            "version": "adapters.1.3.0",
        }

    def folder_config_problems(self, config: dict, manifest) -> list[str]:
        ours = manifest.method["peft_config"]["config"]
        theirs = config.get("config") if isinstance(config.get("config"), dict) else {}
        problems = []
        for key in ("mh_adapter", "output_adapter", "non_linearity", "original_ln_before", "original_ln_after",
                    "residual_before_ln", "ln_before", "ln_after", "is_parallel", "use_gating", "scaling"):
            if theirs.get(key) != ours[key]:
                problems.append(f"config.{key} is {theirs.get(key)!r}, the bundle's is {ours[key]!r}")
        return problems


ADAPTER = AdapterSpec()
