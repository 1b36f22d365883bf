"""Predicted peak resident memory and step time of a bundle's training step, per (batch, seq).

Derived from the bundle itself, not looked up: the frozen and trainable tensors' sizes and
quantization (manifest), the memory plan the exporter applied (``producer.memory``: recompute
policy, loss chunks) and the model config (layers L, hidden H, intermediate I, heads, kv heads,
vocabulary V). Sizes in bytes; N = batch x seq tokens, all of them assumed to carry a label
(the worst case for the loss head).

    peak = runtime + weights + trainable state + max(loss phase, first backward block)

- runtime: the process with onnxruntime loaded and the sessions built, without tensors
  (``RUNTIME_BYTES``, measured once, see below).
- weights: frozen tensors as stored (int8: 1 byte + fp32 scales per row; fp32: 4 bytes), held
  once by the session.
- trainable state: 4 fp32 copies (weights, gradients, AdamW m and v).
- stored activations (alive from the forward into the backward pass), fp32:
    stream: the 2L+1 residual-stream tensors (N, H)            (every policy)
    cheap:  + per layer the frozen projections' outputs q, k, v, gate, up
    mlp:    + per layer gate and up
    none:   + per layer everything the backward reads (``_layer_activations``)
- loss phase: the LM head's weight in fp32 (dequantized once, shared by the chunks) + one chunk's
  logits, log-probabilities and their gradient (3 x N/chunks x V) + the final norm's output.
- first backward block: with recompute, one layer's forward activations again plus the
  gradients flowing through it (the last layer's, when every stored activation is still alive).
- ``ALLOCATOR_OVERHEAD``: onnxruntime's arena hands out blocks rounded up and keeps freed blocks
  for reuse, and glibc keeps freed pages; measured as a factor on the activation terms.

Step time: useful FLOPs (forward 2 x frozen-projection weights x tokens + LM head + attention;
the backward the same again, input gradients only since the base is frozen) plus what the
recompute policy computes twice, divided by the profile's sustained throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgetune.bundle import Manifest

MB = 1024 * 1024
FP32 = 4
# Resident size of the training process with onnxruntime, numpy and tokenizers imported and the
# training, eval and optimizer sessions built, less the tensors counted separately: measured with
# bench/plan_check.py (RSS after loading minus the weights' bytes) for SmolLM2-135M on x86-64
# Linux, onnxruntime-training-cpu 1.19.2. Grows with the graph (node count), so it is scaled by
# the number of layers: per layer + constant.
RUNTIME_BASE_BYTES = 150 * MB
RUNTIME_PER_LAYER_BYTES = 2 * MB
ALLOCATOR_OVERHEAD = 1.0


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "ModelShape":
        c = manifest.base_model.get("config", {})
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if k not in c]
        if missing:
            from edgetune.errors import BundleError

            raise BundleError(f"the bundle's manifest has no {', '.join(missing)} in base_model.config; "
                              "re-export it with this edgetune to plan it.")
        heads = c["num_attention_heads"]
        return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"])

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Prediction:
    batch: int
    seq: int
    peak_bytes: int
    parts: dict  # name -> bytes
    step_seconds: float | None
    flops: float

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def tensor_bytes(manifest: Manifest) -> tuple[int, int]:
    """(frozen bytes as stored, trainable element count)."""
    frozen = 0
    for t in manifest.frozen:
        n = math.prod(t.shape)
        if t.quantization != "none" and len(t.shape) >= 1:
            frozen += n * 1 + t.shape[0] * FP32  # int8 values + one fp32 scale per output row
        else:
            frozen += n * FP32
    trainable = sum(math.prod(t.shape) for t in manifest.trainable)
    return frozen, trainable


def _layer_activations(m: ModelShape, batch: int, seq: int) -> int:
    """Bytes one decoder layer's backward reads from its forward (no recompute), fp32.

    Per token: the two norms' outputs (2H), q, k, v (q + 2 kv) and their rotary copies (q + kv),
    the attention output (q), gate, up, SiLU(gate) and its product (4 I); per (head, query,
    key): the softmax probabilities and the masked scores (2).
    """
    n = batch * seq
    per_token = 2 * m.hidden + 2 * m.q_dim + 3 * m.kv_dim + 4 * m.intermediate
    return FP32 * (n * per_token + 2 * batch * m.heads * seq * seq)


def stored_activations(m: ModelShape, policy: str, batch: int, seq: int) -> int:
    n = batch * seq
    stream = (2 * m.layers + 1) * n * m.hidden * FP32
    if policy == "full":
        return stream
    if policy == "cheap":
        return stream + m.layers * n * (m.q_dim + 2 * m.kv_dim + 2 * m.intermediate) * FP32
    if policy == "mlp":
        return stream + m.layers * n * 2 * m.intermediate * FP32
    return stream + m.layers * _layer_activations(m, batch, seq)  # none


def flops(m: ModelShape, manifest: Manifest, policy: str, batch: int, seq: int) -> float:
    """FLOPs of one training step: forward + backward (input gradients) + recomputed forward."""
    n = batch * seq
    proj = sum(math.prod(t.shape) for t in manifest.frozen if len(t.shape) == 2 and ".layers." in t.graph_name)
    attention = 2.0 * 2 * batch * m.heads * seq * seq * m.head_dim * m.layers
    forward = 2.0 * n * proj + 2.0 * n * m.vocab * m.hidden + attention
    recompute = {"full": 2.0 * n * proj + attention, "mlp": 2.0 * n * proj * 0.3 + attention,
                 "cheap": attention, "none": 0.0}.get(policy, 0.0)
    return 2 * forward + recompute


def predict(manifest: Manifest, batch: int, seq: int, gflops: float | None = None) -> Prediction:
    m = ModelShape.from_manifest(manifest)
    memory = manifest.producer.get("memory") or {}
    policy = memory.get("recompute", "none")
    chunks = max(1, int(memory.get("loss_chunks") or 1))
    frozen, trainable = tensor_bytes(manifest)
    n = batch * seq
    stored = stored_activations(m, policy, batch, seq)
    head_fp32 = m.vocab * m.hidden * FP32 if manifest.quantization != "none" else 0
    loss_phase = head_fp32 + 3 * math.ceil(n / chunks) * m.vocab * FP32 + 2 * n * m.hidden * FP32
    block = _layer_activations(m, batch, seq) if policy != "none" else 0
    block += 3 * n * m.hidden * FP32  # gradients of the stream around the block
    parts = {
        "runtime": RUNTIME_BASE_BYTES + RUNTIME_PER_LAYER_BYTES * m.layers,
        "weights": frozen,
        "trainable": 4 * trainable * FP32,
        "activations": int(ALLOCATOR_OVERHEAD * (stored + max(loss_phase, block))),
    }
    f = flops(m, manifest, policy, batch, seq)
    return Prediction(batch, seq, sum(parts.values()), parts, f / (gflops * 1e9) if gflops else None, f)


def grid(manifest: Manifest, batches=(1, 2, 4, 8, 16), seqs=(64, 128, 256, 512, 1024),
         gflops: float | None = None) -> list[Prediction]:
    return [predict(manifest, b, s, gflops) for b in batches for s in seqs]


def largest_fitting(predictions: list[Prediction], budget: int) -> Prediction | None:
    """The fitting configuration with the most tokens per step (ties: the longer sequence)."""
    fits = [p for p in predictions if p.peak_bytes <= budget]
    return max(fits, key=lambda p: (p.tokens, p.seq)) if fits else None
