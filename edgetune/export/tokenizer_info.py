"""Tokenizer, chat template and special tokens for the bundle (``tokenizer.json`` + manifest)."""

from __future__ import annotations

from pathlib import Path

from edgetune.bundle import TokenizerInfo
from edgetune.errors import ExportError


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def save_tokenizer(tokenizer, model, folder: Path) -> TokenizerInfo:
    """Write ``tokenizer.json`` (the fast tokenizer's own file) and describe its special tokens.

    Stop tokens: the model's eos id(s) from config and generation config, the tokenizer's eos,
    and the template's end-of-turn token when the vocabulary has one (ChatML ``<|im_end|>``).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("the model's tokenizer has no fast (tokenizers) version; save a tokenizer.json with the model.")
    backend.save(str(folder / "tokenizer.json"))
    config = model.config
    generation = getattr(model, "generation_config", None)
    stop = _ids(config.eos_token_id) + _ids(getattr(generation, "eos_token_id", None)) + _ids(tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if template and token in template and token in vocab:
            stop.append(vocab[token])
    stop = sorted(set(stop))
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = stop[0] if stop else 0

    def token(i):
        return tokenizer.convert_ids_to_tokens(i) if i is not None else None

    eos_id = _ids(config.eos_token_id)[:1] or _ids(tokenizer.eos_token_id)[:1]
    return TokenizerInfo(
        file="tokenizer.json",
        chat_template=template,
        bos_token=token(config.bos_token_id),
        eos_token=token(eos_id[0]) if eos_id else None,
        pad_token_id=int(pad),
        stop_token_ids=stop,
    )
