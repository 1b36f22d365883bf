"""A tiny random Llama saved as a Hugging Face folder (config, safetensors, tokenizer), built in-test.

Same architecture family as the default model (Llama, tied embeddings, grouped KV heads, ChatML
template), small enough that an export takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.tiny_tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def build_tiny_model_dir(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Llama folder and return it; ``seed`` fixes the random weights."""
    import torch
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    config = tiny_llama_config(tokenizer.get_vocab_size())
    config.eos_token_id = vocab["<|im_end|>"]
    config.pad_token_id = vocab["<|endoftext|>"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than default init so logits and gradients are not tiny
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 256,
    }))
    return folder
