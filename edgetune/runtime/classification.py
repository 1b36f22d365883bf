"""Task ``sequence-classification``: an encoder with a trainable head, one label per text.

Training runs the bundle's loss graph on either backend (``classification_batch``: labels (B,)).
Scores come from the bundle's logits graph (``classifier_model.onnx``: input_ids, attention_mask and
the current adapter + head tensors as inputs -> logits (B, C)), run by the stock onnxruntime that
both backends carry, so ``eval``, evaluation during training and ``predict`` read the same logits.

Metrics: loss (mean cross-entropy of the logits, as the training graph computes it), accuracy,
macro_f1 (the unweighted mean of every class's F1; a class never predicted or absent counts 0),
and per class ``precision/<name>``, ``recall/<name>``. The best checkpoint ranks by accuracy, then
by lower loss.
"""

from __future__ import annotations

import numpy as np

from edgetune.errors import BundleError
from edgetune.runtime.classification_data import classification_batch, label_names, load_labelled
from edgetune.runtime.tasks import Task

_SESSIONS: dict[tuple[str, int], object] = {}  # (logits graph path, threads) -> InferenceSession, built once


def encoder_tokenizer(bundle):
    """The bundle's tokenizer, one text at a time: no padding or truncation of its own.

    Encoders' tokenizer.json often pads every text to a fixed length (all-MiniLM-L6-v2's: 128);
    batches are padded here to their longest text, and ``max_seq_len`` truncates."""
    from edgetune.runtime.text import load_text

    tokenizer, _ = load_text(bundle)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _load(bundle, path, max_seq_len: int, skip_bad: bool):
    names = label_names(bundle.manifest)  # a broken manifest is refused before any data is read
    tokenizer = encoder_tokenizer(bundle)
    return load_labelled(path, tokenizer, names, max_seq_len, skip_bad=skip_bad)


def logits_session(bundle, threads: int = 0):
    """The logits graph's InferenceSession (stock onnxruntime), checked against the manifest."""
    from edgetune.runtime.ort_import import onnxruntime
    from edgetune.runtime.session_options import generation_options

    path = bundle.path("classifier")
    key = (str(path.resolve()), threads)
    if key not in _SESSIONS:
        ort = onnxruntime()
        try:
            session = ort.InferenceSession(str(path), generation_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT reports load failures as its own exception types
            raise BundleError(f"{path}: onnxruntime cannot load the logits graph ({str(exc)[:300]}); "
                              "re-export the bundle.") from None
        have = {i.name for i in session.get_inputs()}
        absent = [t.graph_name for t in bundle.manifest.trainable if t.graph_name not in have]
        if absent or "input_ids" not in have:
            raise BundleError(f"{path}: the logits graph lacks inputs {', '.join(absent[:3]) or 'input_ids'} the "
                              "manifest names; re-export the bundle.")
        _SESSIONS[key] = session
    return _SESSIONS[key]


def batch_logits(session, batch: dict[str, np.ndarray], tensors: dict[str, np.ndarray]) -> np.ndarray:
    """(B, C) float32 logits of a padded batch under ``tensors`` (graph name -> array)."""
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    feed.update({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()})
    (logits,) = session.run(["logits"], feed)
    return logits


def all_logits(bundle, tensors: dict[str, np.ndarray], examples, batch_size: int, threads: int = 0) -> np.ndarray:
    session = logits_session(bundle, threads)
    pad = bundle.manifest.tokenizer.pad_token_id
    parts = [batch_logits(session, classification_batch(examples[i:i + batch_size], pad), tensors)
             for i in range(0, len(examples), batch_size)]
    return np.concatenate(parts).astype(np.float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def scores(logits: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Loss, accuracy, macro-F1 and per-class precision/recall of (N, C) logits against (N,) labels."""
    logp = log_softmax(logits)
    predicted = logits.argmax(axis=1)
    metrics = {"loss": float(-logp[np.arange(len(labels)), labels].mean()),
               "accuracy": float((predicted == labels).mean())}
    f1s, per_class = [], {}
    for c, name in enumerate(names):
        tp = int(((predicted == c) & (labels == c)).sum())
        precision = tp / max(int((predicted == c).sum()), 1)
        recall = tp / max(int((labels == c).sum()), 1)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        per_class[f"precision/{name}"], per_class[f"recall/{name}"] = precision, recall
    metrics["macro_f1"] = float(np.mean(f1s))
    return {**metrics, **per_class, "examples": len(labels)}


def _evaluate(bundle, backend, examples, batch_size: int) -> dict:
    names = label_names(bundle.manifest)
    logits = all_logits(bundle, backend.trainable(), examples, batch_size)
    return scores(logits, np.array([e.label for e in examples]), names)


TASK = Task(name="sequence-classification", metric="accuracy", load=_load, batch=classification_batch,
            evaluate=_evaluate, rank=lambda m: (m["accuracy"], -m["loss"]))


def predict(bundle, texts: list[str], tensors: dict[str, np.ndarray], threads: int = 0,
            max_seq_len: int = 512) -> list[dict]:
    """Each text's predicted label and the probability of every label, under ``tensors``."""
    from edgetune.runtime.classification_data import LabelledText

    names = label_names(bundle.manifest)
    tokenizer = encoder_tokenizer(bundle)
    examples = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        if len(ids) > max_seq_len:
            ids = ids[:max_seq_len - 1] + ids[-1:]
        examples.append(LabelledText(np.array(ids, dtype=np.int64), 0))
    probabilities = np.exp(log_softmax(all_logits(bundle, tensors, examples, 16, threads)))
    return [{"text": text, "label": names[int(p.argmax())], "probabilities": {n: float(v) for n, v in zip(names, p)}}
            for text, p in zip(texts, probabilities)]

