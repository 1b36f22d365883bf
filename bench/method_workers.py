"""PyTorch references of each adaptation method, timed like bench/workers.py (one per process).

    python bench/method_workers.py '{"reference": "peft-lora", "model": ..., "config": {...},
                                     "peft_config": {...}, "adamw": {...}, "batch": 4, "seq": 128, ...}'

``reference`` (see ``REFERENCES``): ``peft-lora`` (PEFT LoRA, with ``all-linear`` and the rank and
alpha patterns), ``peft-prefix`` (PEFT prefix tuning), ``adapters`` (AdapterHub ``adapters``'
bottleneck adapter of the bundle's saved-adapter config) or ``full`` (every weight trainable,
fp32). ``config`` is the bundle's method config, ``peft_config`` its ecosystem config. The base
model is loaded in fp32 as bench/workers.py loads it; no activation checkpointing (PyTorch's
default). Prints one line ``RESULT {json}`` as bench/workers.py does, with ``trainable_parameters``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` and the repo's `edgetune`

from bench.data import make_batch  # noqa: E402
from bench.workers import LEARNING_RATE, measure  # noqa: E402


def base_model(name: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.export.sources import resolve_source

    source = resolve_source(name)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(source.folder, attn_implementation="eager", dtype=torch.float32,
                                                use_cache=False, **kwargs)


def peft_lora(model, a: dict):
    from peft import LoraConfig, get_peft_model

    cfg = a["config"]
    targets = "all-linear" if list(cfg["targets"]) == ["all-linear"] else list(cfg["targets"])  # PEFT resolves it
    return get_peft_model(model, LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=targets,
                                            rank_pattern=dict(cfg.get("rank_pattern") or {}),
                                            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
                                            lora_dropout=0.0, use_rslora=cfg.get("use_rslora", False),
                                            task_type="CAUSAL_LM"))


def peft_prefix(model, a: dict):
    from peft import PrefixTuningConfig, get_peft_model

    cfg = a["config"]
    return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg["num_virtual_tokens"],
                                                    prefix_projection=bool(cfg.get("projection")),
                                                    encoder_hidden_size=cfg.get("projection") or None))


def hub_adapter(model, a: dict):
    import adapters

    hub = a["peft_config"]  # {"name", "config"}: the AdapterHub config the bundle's to-peft writes
    adapters.init(model)
    model.add_adapter(hub["name"], config=adapters.AdapterConfig.load(hub["config"]))
    model.train_adapter(hub["name"])  # freezes the base, activates the adapter
    return model


def full(model, a: dict):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


REFERENCES = {"peft-lora": peft_lora, "peft-prefix": peft_prefix, "adapters": hub_adapter, "full": full}


def run(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    model = REFERENCES[a["reference"]](base_model(a["model"]), a)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = a["adamw"]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=tuple(adamw["betas"]), eps=adamw["eps"],
                            weight_decay=adamw["weight_decay"])
    batch = make_batch(model.config.vocab_size, a["batch"], a["seq"], a.get("prompt_fraction", 0.0))
    data = {k: torch.from_numpy(v) for k, v in batch.items()}

    def step() -> float:
        loss = model(**data).loss  # transformers' shifted cross-entropy, -100 ignored
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    result = measure(step, a["warmup"], a["steps"])
    result["trainable_parameters"] = sum(p.numel() for p in params)
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
