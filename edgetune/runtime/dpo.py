"""Task ``dpo``: Direct Preference Optimization on the device.

Reference log-probabilities: the reference policy is the base model, i.e. the bundle's initial
adapter switched off (the method's ``adapter_off``). Before the first step each pair's summed
response log-probabilities under the reference are computed once with the bundle's eval graph and
cached in the state folder (``reference-<key>.npy``, keyed by the token ids and the eval graph), so a
training step is one policy forward/backward over the chosen + rejected rows.

The DPO graph outputs one scalar, the loss over its rows (export/dpo_graph.py). One row's log-probability
is read from it by feeding that row as the chosen reply of a pair whose rejected reply has no label
token and with zero references: loss = softplus(-beta * logp), so logp = -log(expm1(loss)) / beta.
The same identity gives a pair's reward margin beta * ((pi(c) - ref(c)) - (pi(r) - ref(r))) from the
pair's loss, which is how ``eval`` scores pairs.

Metrics: loss (the DPO loss), accuracy (pairs whose reward margin is above ``TIE``; margins closer
to 0 — e.g. the adapter off, where the policy is the reference — are float32 noise and count as
ties, not wins), margin (mean reward margin, in nats), logp_accuracy (pairs where the policy gives
the chosen reply the higher summed log-probability: meaningful for the base model as well).
"""

from __future__ import annotations

import hashlib

import numpy as np

from edgetune.constants import IGNORE_INDEX
from edgetune.errors import BundleError
from edgetune.runtime.adapter_source import disabled
from edgetune.runtime.batches import pad_batch
from edgetune.runtime.dpo_data import PreferencePair, load_preferences
from edgetune.runtime.tasks import Task
from edgetune.runtime.text import load_text

TIE = 1e-4  # reward margins (beta-scaled nats) at or below this are ties


def beta_of(manifest) -> float:
    beta = (manifest.task_config or {}).get("beta")
    if not isinstance(beta, (int, float)) or not 0 < beta <= 100:
        raise BundleError(f"the bundle's task_config has no valid dpo beta ({beta!r}); re-export it with --task dpo.")
    return float(beta)


def _load(bundle, path, max_seq_len: int, skip_bad: bool):
    tokenizer, template = load_text(bundle)
    beta_of(bundle.manifest)  # a broken manifest is refused before any data is read
    return load_preferences(path, tokenizer, template, max_seq_len, skip_bad=skip_bad)


def preference_batch(pairs: list[PreferencePair], pad_id: int) -> dict[str, np.ndarray]:
    """P pairs -> 2P rows, the chosen replies first (rows 0..P-1), then the rejected ones; + ref_logps (2P,)."""
    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    ref = [p.ref for p in pairs]
    if any(r is None for r in ref):
        raise RuntimeError("preference pairs batched before their reference log-probabilities were computed")
    batch["ref_logps"] = np.array([r[0] for r in ref] + [r[1] for r in ref], dtype=np.float32)
    return batch


def _from_loss(loss: float) -> float:
    """loss = softplus(-x) -> x = -log(expm1(loss)), computed stably in float64."""
    loss = float(loss)
    if loss <= 0:
        return float("inf")
    return -(loss + np.log(-np.expm1(-loss)))


def _row_logp(backend, example, pad_id: int, beta: float) -> float:
    """Summed log-probability of ``example``'s label tokens under the backend's current tensors."""
    blank = type(example)(example.input_ids, np.full_like(example.labels, IGNORE_INDEX))
    batch = pad_batch([example, blank], pad_id)
    batch["ref_logps"] = np.zeros(2, np.float32)
    return _from_loss(backend.eval_loss(batch)) / beta


def _cache_key(bundle, pairs: list[PreferencePair]) -> str:
    h = hashlib.sha256()
    h.update((bundle.manifest.files.get(bundle.file_name("eval") or "", "") + bundle.manifest.base_sha256).encode())
    for p in pairs:
        for e in (p.chosen, p.rejected):
            h.update(np.int64(len(e.input_ids)).tobytes() + e.input_ids.tobytes() + e.labels.tobytes())
    return h.hexdigest()[:16]


def _prepare(bundle, backend, pairs: list[PreferencePair], state, data_sha256: str, log) -> list[PreferencePair]:
    """Attach reference log-probabilities (adapter off) to every pair, from the cache or computed once."""
    manifest, beta = bundle.manifest, beta_of(bundle.manifest)
    key = _cache_key(bundle, pairs)
    refs = state.read_reference(key, (len(pairs), 2))
    if refs is None:
        log(f"computing reference log-probabilities of {len(pairs)} preference pairs (adapter off; once, cached)")
        pad = manifest.tokenizer.pad_token_id
        current = backend.trainable()
        backend.set_trainable(disabled(bundle, backend.initial_adapter()))
        try:
            refs = np.array([[_row_logp(backend, p.chosen, pad, beta), _row_logp(backend, p.rejected, pad, beta)]
                             for p in pairs], dtype=np.float64)
        finally:
            backend.set_trainable(current)
        state.write_reference(key, refs)
    return [PreferencePair(p.chosen, p.rejected, (float(r[0]), float(r[1]))) for p, r in zip(pairs, refs)]


def pair_margins(backend, pairs: list[PreferencePair], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(losses, reward margins) of each pair under the backend's current tensors, one pair per run."""
    losses = np.array([backend.eval_loss(preference_batch([p], pad_id)) for p in pairs], dtype=np.float64)
    return losses, np.array([_from_loss(x) for x in losses])


def _evaluate(bundle, backend, pairs: list[PreferencePair], batch_size: int) -> dict:
    losses, margins = pair_margins(backend, pairs, bundle.manifest.tokenizer.pad_token_id)
    beta = beta_of(bundle.manifest)
    ref_gap = np.array([p.ref[0] - p.ref[1] for p in pairs])
    policy_gap = margins / beta + ref_gap  # pi(c) - pi(r)
    return {"loss": float(losses.mean()), "accuracy": float((margins > TIE).mean()), "margin": float(margins.mean()),
            "logp_accuracy": float((policy_gap > 0).mean()), "examples": len(pairs)}


TASK = Task(name="dpo", metric="accuracy", load=_load, batch=preference_batch, evaluate=_evaluate,
            rank=lambda m: (m["accuracy"], -m["loss"]), prepare=_prepare)
