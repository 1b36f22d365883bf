"""A tiny BPE tokenizer with ChatML special tokens, trained in-test (no hub, no files)."""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the colour of the sky? The sky is blue.",
    "Name a fruit. An apple is a fruit, and so is a pear.",
    "Say hello. hello there, how are you today?",
    "Count to three. one two three four five six seven eight nine ten",
    "user assistant system instruction response context output text",
    "Convert to a record. name=Alice; age=34; city=Oslo",
    "The quick brown fox jumps over the lazy dog.",
]


def build_tiny_tokenizer():
    """Byte-level BPE over a few sentences; ids 0, 1, 2 are the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer
