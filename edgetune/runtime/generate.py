"""Device-side decoding with the bundle's generation graph (numpy + onnxruntime only, never torch).

The graph (``edgetune.export.generation_graph``) takes the adapter tensors as inputs, so one
session serves any adapter: the trained one, the bundle's initial one, or ``adapter_source.disabled``
(the method's "adapter off": LoRA with B = 0 is the base model).
"""

from __future__ import annotations

import numpy as np

from edgetune.bundle import Bundle
from edgetune.errors import BundleError, EdgetuneError
from edgetune.runtime.adapter_source import check_adapter
from edgetune.runtime.generation_session import open_session
from edgetune.runtime.session_options import generation_options


class Generator:
    """One ONNX Runtime session on the bundle's generation graph; ``threads=0`` lets ORT choose.

    ``compute`` "exact" or "int8" and ``cache`` (reuse ORT's optimised graph from
    ``<bundle>/generation-cache``): see ``edgetune.runtime.generation_session``.
    """

    def __init__(self, bundle: Bundle, threads: int = 0, compute: str = "exact", cache: bool = True):
        manifest = bundle.manifest
        info = manifest.generation
        if info is None:
            raise BundleError(f"bundle {str(bundle.folder)!r} has no generation graph; re-export it with this edgetune.")
        path = bundle.folder / info.file  # named in messages; open_session hashes (and may open) it
        options = generation_options(threads)  # checks threads
        self.session = open_session(bundle, options, compute=compute, cache=cache)
        self.info = info
        self.manifest = manifest
        from edgetune.fixed_adapter import fixed_tensors, read_fixed

        self.fixed = {}  # adapter inputs never trained (FFA-LoRA's A); {} usually
        if fixed_tensors(manifest):
            bundle.path("fixed_adapter")  # hashed (Bundle.open verify=roles) before it is read
            self.fixed = read_fixed(bundle.folder, manifest)
        names = {i.name for i in self.session.get_inputs()}
        absent = [n for n in (*info.past_inputs, *info.adapter_inputs) if n not in names]
        if absent:
            raise BundleError(f"{path}: graph inputs {', '.join(absent[:3])} named by the manifest do not exist; "
                              "the bundle is inconsistent — re-export it.")

    # --- public -------------------------------------------------------------------------------
    def logits(self, input_ids, attention_mask, adapter: dict[str, np.ndarray]) -> np.ndarray:
        """Full forward with an empty cache: (B, T) ids and 0/1 mask -> (B, T, V) float32 logits."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or mask.shape != ids.shape or ids.shape[1] == 0:
            raise EdgetuneError(f"`input_ids` and `attention_mask` must both be (batch, tokens) with tokens > 0, "
                                f"got {ids.shape} and {mask.shape}.")
        # Positions count real tokens (as transformers' generate does), after any initial cache; padding gets a dummy 1.
        feeds = self._adapter_feeds(adapter)  # checks the adapter first
        past = self._initial_past(ids.shape[0], adapter)
        start = past[0].shape[2]
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1 + start, 1)
        mask = np.concatenate([np.ones((ids.shape[0], start), np.int64), mask], axis=1)
        logits, _ = self._step(ids, mask, positions, past, feeds)
        return logits

    def generate(self, prompt_ids, adapter: dict[str, np.ndarray], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids=()) -> np.ndarray:
        """Decode after ``prompt_ids`` (T,) with the KV cache; returns the new ids (stop id excluded)."""
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if prompt.size == 0:
            raise EdgetuneError("the prompt is empty; give at least one token.")
        if max_new_tokens < 0:
            raise EdgetuneError(f"`max_new_tokens` must be >= 0, got {max_new_tokens}.")
        if temperature < 0 or not 0 < top_p <= 1:
            raise EdgetuneError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}.")
        feeds = self._adapter_feeds(adapter)
        stop = {int(s) for s in stop_ids}
        rng = np.random.default_rng(seed)
        past = self._initial_past(1, adapter)
        ids, start, new = prompt[None, :], past[0].shape[2], []  # first step: the whole prompt; then one token per step
        for _ in range(max_new_tokens):
            end = start + ids.shape[1]
            logits, past = self._step(ids, np.ones((1, end), np.int64), np.arange(start, end, dtype=np.int64)[None, :],
                                      past, feeds)
            token = pick_token(logits[0, -1], temperature, top_p, rng)
            if token in stop:
                break
            new.append(token)
            ids, start = np.array([[token]], np.int64), end
        return np.array(new, dtype=np.int64)

    # --- internals ----------------------------------------------------------------------------
    def _adapter_feeds(self, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """generation-input name -> contiguous float32, after checking every tensor's presence and shape."""
        check_adapter(self.manifest, adapter)
        adapter = {**self.fixed, **adapter}
        return {name: np.ascontiguousarray(adapter[g], dtype=np.float32) for name, g in self.info.adapter_inputs.items()}

    def _initial_past(self, batch: int, adapter: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The cache before the first token: empty, or what the method makes of ``adapter`` (prefix tuning)."""
        from edgetune.methods import get_method

        given = get_method(self.manifest.method["name"]).initial_past(self.manifest, adapter)
        if given is not None:
            return [np.ascontiguousarray(np.broadcast_to(p, (batch, *p.shape[1:])), np.float32) for p in given]
        shape = (batch, self.info.num_kv_heads, 0, self.info.head_dim)  # (B, kv_heads, past=0, head_dim)
        return [np.zeros(shape, np.float32) for _ in self.info.past_inputs]

    def _step(self, ids, mask, positions, past, feeds) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph run: mask covers past + new tokens; returns (B, T, V) logits and the new cache."""
        inputs = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.info.past_inputs, past)), **feeds}
        if self.info.has_position_ids:
            inputs["position_ids"] = positions
        outputs = self.session.run(["logits", *self.info.present_outputs], inputs)
        return outputs[0], outputs[1:]


def pick_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """(V,) logits -> a token id: greedy at temperature 0, else softmax(logits / T) cut to nucleus top_p."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = order[: int(np.searchsorted(cumulative, top_p, side="left")) + 1]
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])
