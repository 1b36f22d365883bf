"""A tiny random BERT encoder saved as a Hugging Face folder (config, safetensors, WordPiece tokenizer), built in-test.

Same family as all-MiniLM-L6-v2 (BertModel, absolute positions, GELU, post-LayerNorm), small enough
that a sequence-classification export takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CORPUS = [
    "hello there how are you today", "good morning nice to meet you", "hi friend",
    "what is the weather like tomorrow", "will it rain in oslo", "is it sunny outside",
    "play some music please", "turn the volume up", "skip this song",
]


def build_tiny_bert_tokenizer():
    """WordPiece over a few sentences, lower-cased, with BERT's [CLS] ... [SEP] post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIAL, show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tokenizer


def tiny_bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, hidden_dropout_prob=0.1,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=0)


def build_tiny_bert_dir(folder: Path, seed: int = 0) -> Path:
    """Write a tiny BertModel folder (as all-MiniLM-L6-v2 ships: a BertModel checkpoint) and return it."""
    import torch
    from transformers import BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_bert_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = tiny_bert_config(tokenizer.get_vocab_size())
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():  # larger than default init so the features (and gradients) are not tiny
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length": 64,
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
    }))
    return folder
