"""Full fine-tuning's config and spec (no torch): every weight of the model is trainable, in fp32.

What differs from an adapter method, all stated here and read by the rest through the spec:
  * the trainable tensors are the model's own parameters (``model.layers.0.mlp.down_proj.weight``),
    keyed in deltas and folders by their transformers state-dict name;
  * "adapter off" is the base model: the weights as exported (not zeros);
  * a delta holds W - W_base, the difference from the exported base (so fp16/int8 codecs quantize
    a small difference, not the weights), and importing one adds the base back;
  * the base cannot be quantized (every weight is trained in fp32);
  * PEFT has no full fine-tuning adapter: ``to-peft`` writes a documented folder instead
    (``FOLDER_README`` below), a safetensors state dict that transformers models load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgetune.methods.base import MethodConfig, MethodSpec

WEIGHTS = "model.safetensors"
DESCRIPTION = "edgetune_full.json"
FORMAT = "edgetune-full-finetune"
FOLDER_README = (
    f"{WEIGHTS}: every fine-tuned weight (fp32) under its transformers state-dict name; a tied LM head "
    "is left out, as transformers saves it. Load into the base model with "
    f"model.load_state_dict(safetensors.torch.load_file('{WEIGHTS}'), strict=False): the only "
    "missing keys are tied weights. "
    f"{DESCRIPTION}: the base model id and SHA-256 the weights were trained from."
)


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning has no hyper-parameters of its own (the optimizer's are in the manifest)."""

    name = "full"


class FullSpec(MethodSpec):
    name = "full"
    config_class = FullConfig
    layer_module = "edgetune.export.methods.full"
    description = "every weight trainable in fp32 (needs --quantize none)"
    tensor_roles = ("weight", "bias")  # every parameter of a transformers model is one of these
    quantized_base = "--method full trains every weight in fp32, so the base cannot be quantized; pass --quantize none"
    delta_from_base = True

    def summary(self, config: FullConfig) -> str:
        return "full fine-tuning (every weight trainable, fp32)"

    def peft_key(self, module_path: str, role: str) -> str:
        """The transformers state-dict name (``model.layers.0.mlp.down_proj.weight``)."""
        return f"{module_path}.{role}"

    def adapter_off(self, manifest, adapter, base: Callable[[], dict] | None = None) -> dict[str, np.ndarray]:
        """The base model: every weight as exported."""
        if base is None:
            raise ValueError("full fine-tuning's adapter off needs the exported weights (``base``)")
        return {t.graph_name: np.asarray(base()[t.graph_name], np.float32) for t in self.trainable(manifest)}

    def to_delta(self, tensors: dict[str, np.ndarray], base: Callable[[], dict]) -> dict[str, np.ndarray]:
        """Trained weights -> W - W_base (both by the same keys)."""
        reference = base()
        return {k: (v - reference[k]).astype(np.float32) for k, v in tensors.items()}

    def from_delta(self, tensors: dict[str, np.ndarray], base: Callable[[], dict]) -> dict[str, np.ndarray]:
        """W - W_base -> trained weights."""
        reference = base()
        return {k: (reference[k] + v).astype(np.float32) for k, v in tensors.items()}

    # --- the ecosystem folder (``to-peft`` / ``from-peft`` through ``edgetune.peft_io``) -------
    ecosystem = "transformers"
    folder_config_file = DESCRIPTION
    folder_weights = WEIGHTS
    folder_load_hint = ("model.load_state_dict(safetensors.torch.load_file('{folder}/" + WEIGHTS + "'), strict=False) "
                        "(full fine-tuning has no PEFT adapter; the folder holds the fine-tuned weights)")

    def peft_config(self, config: FullConfig, base_model: str) -> dict:
        """What ``to-peft`` writes as ``edgetune_full.json`` (PEFT has no full fine-tuning adapter)."""
        return {"format": FORMAT, "version": 1, "base_model": base_model, "layout": FOLDER_README}

    def folder_config_problems(self, config: dict, manifest) -> list[str]:
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            return [f"{DESCRIPTION} is not an {FORMAT} description"]
        return []


FULL = FullSpec()
