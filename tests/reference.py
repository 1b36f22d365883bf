"""PyTorch + PEFT reference computations the ONNX results are checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def peft_model(model_dir: Path, manifest, adapter: dict[str, np.ndarray] | None = None):
    """The tiny base with a real PEFT LoRA of the bundle's config; ``adapter`` by PEFT key."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    cfg = manifest.method["config"]
    targets = "all-linear" if list(cfg["targets"]) == ["all-linear"] else list(cfg["targets"])  # PEFT resolves it
    model = get_peft_model(base, LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=targets,
                                            rank_pattern=dict(cfg.get("rank_pattern", {})),
                                            alpha_pattern=dict(cfg.get("alpha_pattern", {})),
                                            lora_dropout=0.0, use_rslora=cfg["use_rslora"], task_type="CAUSAL_LM"))
    if adapter is not None:
        result = set_peft_model_state_dict(model, {k: torch.tensor(v) for k, v in adapter.items()})
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise AssertionError(f"PEFT did not take the adapter: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model


def peft_adamw_step(model, batch: dict[str, np.ndarray], lr: float, optimizer: dict):
    """One AdamW step of the PEFT model on ``batch``; returns (loss, {peft key: updated tensor})."""
    import torch
    from peft import get_peft_model_state_dict

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(optimizer["betas"]), eps=optimizer["eps"],
                            weight_decay=optimizer["weight_decay"])
    model.train()
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})  # transformers' own shifted CE, ignore -100
    out.loss.backward()
    opt.step()
    state = get_peft_model_state_dict(model)
    return float(out.loss), {k: v.detach().numpy().copy() for k, v in state.items()}
