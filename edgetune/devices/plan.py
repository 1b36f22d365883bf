"""Predicted peak resident memory and step time of ``edgetune train``, per (batch, seq).

Derived from the bundle itself, not looked up: the frozen and trainable tensors' sizes and
quantization (manifest), the memory plan the exporter applied (``producer.memory``: recompute
policy, loss chunks) and the model config (layers L, hidden H, intermediate I, heads, kv heads,
vocabulary V). Sizes in bytes; N = batch x seq tokens, all of them assumed to carry a label
(the worst case for the loss head).

    peak = runtime + weights + trainable state + command           (loaded, before the first step)
         + max(step, first-step floor)                              (onnxruntime's arena keeps it)
         + checkpoint                                               (serialized in memory to save it)

- runtime: the process with onnxruntime imported and the training, eval and optimizer sessions
  built, without the tensors: 70 MB + 3 MB per layer (measured: RSS after loading minus tensor
  bytes, 74 MB for a 2-layer test model and 160 MB for 30-layer SmolLM2-135M; x86-64 Linux,
  onnxruntime-training-cpu 1.19.2). The graph grows with the layers, so does its in-memory form.
- weights: frozen tensors as stored (int8: 1 byte + an fp32 scale per row; fp32: 4 bytes).
- trainable state: 4 fp32 copies (weights, gradients, AdamW m and v).
- command: what ``train`` adds around the engine: Python modules, the data (40 MB, measured on the
  2-layer model) and the tokenizer (~680 bytes per vocabulary entry: 32 MB for SmolLM2's 49,152).
- step: ``ALLOCATOR_OVERHEAD`` x (stored activations + the larger of the loss phase and the first
  backward block):
    stored (alive from the forward into the backward pass), fp32:
      stream: the 2L+1 residual-stream tensors (N, H)           (every policy)
      cheap:  + per layer the frozen projections' outputs q, k, v, gate, up
      mlp:    + per layer gate and up
      none:   + per layer everything the backward reads (``_layer_activations``)
    loss phase: the LM head's weight dequantized to fp32 once (shared by the chunks; with head
      slices, one slice of V / slices rows at a time) + one chunk's
      logits, log-probabilities and their gradient (3 x N/chunks x V) + the final norm's output.
    first backward block: with recompute, one layer's forward activations again plus the
      gradients around it.
- first-step floor (int8 bases): the embedding's and the LM head's fp32 copies (V x H each) and a
  loss chunk. The embedding's copy, freed into the arena at the start of the step, is carved up
  by small allocations before the head's copy is needed, so the arena grows by both; larger
  steps reuse that region for activations (measured: 533-535 MB peak at 1 x 128 whatever the
  recompute policy).
- checkpoint: the frozen weights and 3 copies of the trainable ones, serialized in memory before
  the file is written; the arena still holds the step's memory then.
- ``ALLOCATOR_OVERHEAD`` = 1.12: onnxruntime's arena rounds blocks up and keeps freed ones;
  fitted once on bench/plan_check.py's configurations (SmolLM2-135M, cheap and full recompute).

Step time: useful FLOPs (forward 2 x frozen-projection weights x tokens + LM head + attention;
the backward the same again, input gradients only since the base is frozen) plus what the
recompute policy computes twice, divided by the profile's sustained throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgetune.bundle import Manifest
from edgetune.errors import BundleError

MB = 1024 * 1024
FP32 = 4
RUNTIME_BASE_BYTES = 70 * MB  # see the module docstring for where each constant was measured
RUNTIME_PER_LAYER_BYTES = 3 * MB
COMMAND_BYTES = 40 * MB
TOKENIZER_BYTES_PER_ENTRY = 680
ALLOCATOR_OVERHEAD = 1.12


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
        return cls.from_config(manifest.base_model.get("config", {}))

    @classmethod
    def from_config(cls, c: dict) -> "ModelShape":
        """From a Hugging Face config's fields (as the manifest's ``base_model.config`` keeps them)."""
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if not c.get(k)]
        if missing:
            from edgetune.errors import BundleError

            raise BundleError(f"the model config has no {', '.join(missing)}; re-export the bundle with this "
                              "edgetune to plan it.")
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


@dataclass(frozen=True)
class PlanInputs:
    """What the prediction needs to know of a bundle (from its manifest, or before export from the
    model config and the export options: ``devices/export_choice.py``)."""

    shape: ModelShape
    frozen_bytes: int  # frozen tensors as stored
    trainable: int  # trainable elements
    projection_params: int  # elements of the decoder layers' frozen 2-D weights (FLOPs)
    quantized: bool
    recompute: str
    loss_chunks: int
    head_slices: int = 0  # the head's products in vocabulary slices (export/memory_head.py): one slice's fp32 copy

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "PlanInputs":
        frozen = 0
        for t in manifest.frozen:
            n = math.prod(t.shape)
            if t.quantization != "none" and len(t.shape) >= 1:
                frozen += n * 1 + t.shape[0] * FP32  # int8 values + one fp32 scale per output row
            else:
                frozen += n * FP32
        memory = _memory_plan(manifest.producer.get("memory") or {})
        return cls(shape=ModelShape.from_manifest(manifest), frozen_bytes=frozen,
                   trainable=sum(math.prod(t.shape) for t in manifest.trainable),
                   projection_params=sum(math.prod(t.shape) for t in manifest.frozen
                                         if len(t.shape) == 2 and ".layers." in t.graph_name),
                   quantized=manifest.quantization != "none", recompute=memory.get("recompute", "none"),
                   loss_chunks=max(1, memory.get("loss_chunks") or 1),
                   head_slices=memory.get("head_slices") or 0)


def _memory_plan(memory) -> dict:
    """The manifest's ``producer.memory``, checked where the plan reads it: the manifest is input."""
    problems = []
    if not isinstance(memory, dict):
        raise BundleError(f"the bundle manifest's producer.memory must be an object, got {type(memory).__name__}; "
                          "re-export the bundle.")
    if memory.get("recompute", "none") not in ("full", "cheap", "mlp", "none"):
        problems.append(f"recompute {memory['recompute']!r} (full, cheap, mlp or none)")
    for key in ("loss_chunks", "head_slices"):
        value = memory.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4096):
            problems.append(f"{key} {value!r} (a whole number from 0 to 4096)")
    if problems:
        raise BundleError(f"the bundle manifest's memory plan is malformed: {'; '.join(problems)}; re-export the bundle.")
    return memory


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


def flops(p: PlanInputs, batch: int, seq: int) -> float:
    """FLOPs of one training step: forward + backward (input gradients) + recomputed forward."""
    m, n, proj = p.shape, batch * seq, p.projection_params
    attention = 2.0 * 2 * batch * m.heads * seq * seq * m.head_dim * m.layers
    forward = 2.0 * n * proj + 2.0 * n * m.vocab * m.hidden + attention
    recompute = {"full": 2.0 * n * proj + attention, "mlp": 2.0 * n * proj * 0.3 + attention,
                 "cheap": attention, "none": 0.0}.get(p.recompute, 0.0)
    return 2 * forward + recompute


def predict(bundle: "Manifest | PlanInputs", batch: int, seq: int, gflops: float | None = None) -> Prediction:
    """The prediction for a bundle's manifest (or ``PlanInputs``) at (batch, seq)."""
    p = bundle if isinstance(bundle, PlanInputs) else PlanInputs.from_manifest(bundle)
    m, n = p.shape, batch * seq
    stored = stored_activations(m, p.recompute, batch, seq)
    head_rows = math.ceil(m.vocab / p.head_slices) if p.head_slices > 1 else m.vocab
    head_fp32 = head_rows * m.hidden * FP32 if p.quantized else 0
    chunk = 3 * math.ceil(n / p.loss_chunks) * m.vocab * FP32
    loss_phase = head_fp32 + chunk + 2 * n * m.hidden * FP32
    block = _layer_activations(m, batch, seq) if p.recompute != "none" else 0
    block += 3 * n * m.hidden * FP32  # gradients of the stream around the block
    step = int(ALLOCATOR_OVERHEAD * (stored + max(loss_phase, block)))
    floor = 2 * head_fp32 + chunk if p.quantized else 0
    parts = {
        "runtime": RUNTIME_BASE_BYTES + RUNTIME_PER_LAYER_BYTES * m.layers,
        "weights": p.frozen_bytes,
        "trainable": 4 * p.trainable * FP32,
        "command": COMMAND_BYTES + TOKENIZER_BYTES_PER_ENTRY * m.vocab,
        "step": max(step, floor),
        "checkpoint": p.frozen_bytes + 3 * p.trainable * FP32,
    }
    f = flops(p, batch, seq)
    return Prediction(batch, seq, sum(parts.values()), parts, f / (gflops * 1e9) if gflops else None, f)


def grid(manifest: "Manifest | PlanInputs", batches=(1, 2, 4, 8, 16), seqs=(64, 128, 256, 512, 1024),
         gflops: float | None = None) -> list[Prediction]:
    return [predict(manifest, b, s, gflops) for b in batches for s in seqs]


def largest_fitting(predictions: list[Prediction], budget: int) -> Prediction | None:
    """The fitting configuration with the most tokens per step (ties: the longer sequence)."""
    fits = [p for p in predictions if p.peak_bytes <= budget]
    return max(fits, key=lambda p: (p.tokens, p.seq)) if fits else None
