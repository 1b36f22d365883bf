"""Task ``causal-lm``: instruction / chat / text records, loss over the response tokens."""

from __future__ import annotations

from edgetune.runtime.batches import pad_batch
from edgetune.runtime.data import load_examples
from edgetune.runtime.evaluate import eval_loss
from edgetune.runtime.tasks import Task
from edgetune.runtime.text import load_text


def _load(bundle, path, max_seq_len: int, skip_bad: bool):
    tokenizer, template = load_text(bundle)
    return load_examples(path, tokenizer, template, max_seq_len, skip_bad=skip_bad)


def _evaluate(bundle, backend, examples, batch_size: int) -> dict:
    return dict(eval_loss(backend, examples, batch_size, bundle.manifest.tokenizer.pad_token_id).__dict__)  # loss, perplexity, label_tokens, examples


TASK = Task(name="causal-lm", metric="loss", load=_load, batch=pad_batch, evaluate=_evaluate,
            rank=lambda m: (-m["loss"],))
