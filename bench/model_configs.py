"""Llama-shaped models of published sizes with random weights, for ``bench/run.py --sizes``.

Cost (memory, time) depends on a model's shapes, not on its weights, so the growth bench builds
models from the published configs with seeded random weights instead of downloading checkpoints.
The values below are copied from each model's ``config.json`` on the Hugging Face Hub:

- smollm2-135m: HuggingFaceTB/SmolLM2-135M-Instruct (the built-in default model; the bench uses
  the real weights from its GGUF, this config only counts parameters).
- smollm2-360m: HuggingFaceTB/SmolLM2-360M-Instruct.
- llama-3.2-1b: meta-llama/Llama-3.2-1B-Instruct (rope_scaling "llama3" as published).

Every model here is ``LlamaForCausalLM`` with head_dim = hidden / heads = 64, no biases, SwiGLU
MLP and tied input/output embeddings. A built folder (``build_folder``) holds config.json,
model.safetensors (fp32) and the default model's tokenizer (49,152 tokens; for llama-3.2-1b only
the first 49,152 of its 128,256 embedding rows are ever looked up by real text, which does not
change the cost of a step: the LM head and the embedding are the full 128,256 rows).

    python bench/model_configs.py build smollm2-360m /tmp/growth-models/smollm2-360m
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
          "head_dim": 64, "pretraining_tp": 1}

CONFIGS = {
    "smollm2-135m": {**COMMON, "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rope_scaling": None,
                     "initializer_range": 0.041666666666666664, "bos_token_id": 1, "eos_token_id": 2},
    "smollm2-360m": {**COMMON, "hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15,
                     "num_key_value_heads": 5, "intermediate_size": 2560, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rope_scaling": None,
                     "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2},
    "llama-3.2-1b": {**COMMON, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "initializer_range": 0.02, "bos_token_id": 128000, "eos_token_id": 128001},
}
# Parameter counts as published (model cards / the Hub's safetensors metadata), for the test.
PUBLISHED_PARAMETERS = {"smollm2-135m": 134.5e6, "smollm2-360m": 361.8e6, "llama-3.2-1b": 1.236e9}
# --sizes short names -> config name
SIZES = {"135m": "smollm2-135m", "360m": "smollm2-360m", "1b": "llama-3.2-1b"}
DEFAULT_SIZE = "135m"  # the built-in default model (real weights), never built


def parameter_count(config: dict) -> int:
    """Parameters of a Llama decoder with this config, counted from the shapes (nothing allocated)."""
    h, layers, vocab, inter = (config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"))
    head = config.get("head_dim") or h // config["num_attention_heads"]
    q = config["num_attention_heads"] * head
    kv = config["num_key_value_heads"] * head
    attention = h * q + 2 * h * kv + q * h  # q_proj, k_proj, v_proj, o_proj (no biases)
    mlp = 3 * h * inter  # gate_proj, up_proj, down_proj
    norms = 2 * h  # input_layernorm, post_attention_layernorm
    embeddings = vocab * h * (1 if config["tie_word_embeddings"] else 2)
    return embeddings + layers * (attention + mlp + norms) + h  # + the final norm


def llama_config(name: str):
    """transformers' LlamaConfig for ``name`` (validates the values, e.g. the llama3 rope_scaling)."""
    from transformers import LlamaConfig

    values = {k: v for k, v in CONFIGS[name].items() if k not in ("architectures", "model_type")}
    return LlamaConfig(**values, architectures=CONFIGS[name]["architectures"])


def meta_parameter_count(name: str) -> int:
    """Parameters of the transformers model built on the meta device (shapes only, no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(name))
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def tensor_shapes(name: str) -> dict[str, list[int]]:
    """What a saved checkpoint of ``name`` holds: tensor name -> shape (from the meta-device model)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(name))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    if CONFIGS[name]["tie_word_embeddings"]:
        shapes.pop("lm_head.weight")  # tied: saved once, as the embedding (as save_pretrained does)
    return shapes


def write_random_safetensors(path: Path, shapes: dict[str, list[int]], std: float, seed: int) -> None:
    """Seeded random fp32 weights as one safetensors file, written a tensor at a time.

    Norm weights are 1 and every matrix normal(0, std), as transformers initialises a Llama; but
    streaming keeps the peak at one tensor (the 128,256 x 2,048 embedding: 1 GB) instead of the
    whole 4.9 GB model that ``save_pretrained`` needs. Format: 8-byte little-endian header length,
    the JSON header (dtype, shape, byte offsets per tensor), then the raw little-endian data.
    """
    import math
    import struct

    import numpy as np

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            if len(shape) == 1:  # RMSNorm weights
                values = np.ones(shape, np.float32)
            else:
                values = rng.standard_normal(shape, dtype=np.float32)
                values *= std
            f.write(values.astype("<f4", copy=False).tobytes())
            del values


def build_folder(name: str, out: Path, seed: int = 0) -> Path:
    """Write a Hugging Face folder: config.json, seeded random fp32 weights, the default model's tokenizer.

    Reuses ``out`` when it already holds this config and seed.
    """
    from transformers import AutoTokenizer

    from edgetune.export.sources import resolve_source

    out = Path(out)
    stamp = out / "edgetune-bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"config": CONFIGS[name], "seed": seed}:
        return out
    out.mkdir(parents=True, exist_ok=True)
    llama_config(name).save_pretrained(out)
    write_random_safetensors(out / "model.safetensors", tensor_shapes(name), CONFIGS[name]["initializer_range"], seed)
    source = resolve_source(None)  # the built-in default model: its tokenizer and chat template
    AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file).save_pretrained(out)
    stamp.write_text(json.dumps({"config": CONFIGS[name], "seed": seed}))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "build" or sys.argv[2] not in CONFIGS:
        sys.exit(f"usage: python bench/model_configs.py build {{{'|'.join(CONFIGS)}}} OUT_FOLDER")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's `edgetune`
    print(build_folder(sys.argv[2], Path(sys.argv[3])))
