"""``export --device``: the quantization, recompute policy, loss chunks and head slices that fit a device profile.

Before anything is exported, the plan (``devices/plan.py``) is evaluated on inputs computed from the
model's config (tensor shapes of a Llama-style decoder: embedding, per layer q/k/v/o and
gate/up/down projections, norms) and the method config (LoRA: rank x (in + out) per target per
layer), for every candidate export. Among the candidates predicted to fit at the planned batch
size and length, the fastest (fewest FLOPs per step: least recompute) wins; ties go to an unsliced
LM head (slices cost time the FLOP count does not show: README, "Where the memory went"), then to
int8 (a smaller bundle), then to fewer loss chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgetune.devices.plan import MB, ModelShape, PlanInputs, Prediction, predict
from edgetune.errors import ExportError

QUANTIZE = ("int8", "none")
RECOMPUTE = ("none", "mlp", "cheap", "full")  # least to most memory saved
LOSS_CHUNKS = (8, 32)
HEAD_SLICES = (0, 8)  # int8 bases: one shared fp32 head, or 8 vocabulary slices (export/memory_head.py)


@dataclass(frozen=True)
class Candidate:
    quantize: str
    recompute: str
    loss_chunks: int
    prediction: Prediction
    head_slices: int = 0

    def label(self) -> str:
        return (f"--quantize {self.quantize} --recompute {self.recompute} --loss-chunks {self.loss_chunks} "
                f"--head-slices {self.head_slices}")


def _linear_shapes(m: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder layer."""
    return {"q_proj": (m.hidden, m.q_dim), "k_proj": (m.hidden, m.kv_dim), "v_proj": (m.hidden, m.kv_dim),
            "o_proj": (m.q_dim, m.hidden), "gate_proj": (m.hidden, m.intermediate),
            "up_proj": (m.hidden, m.intermediate), "down_proj": (m.intermediate, m.hidden)}


def inputs_from_config(config: dict, method_config, quantize: str, recompute: str, loss_chunks: int,
                       head_slices: int = 0) -> PlanInputs:
    m = ModelShape.from_config(config)
    linear = _linear_shapes(m)
    projection = m.layers * sum(i * o for i, o in linear.values())
    embeddings = m.vocab * m.hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    norms = (2 * m.layers + 1) * m.hidden
    if quantize == "int8":  # int8 values + an fp32 scale per output row
        frozen = projection + embeddings + 4 * (m.layers * sum(o for _, o in linear.values()) + embeddings // m.hidden)
    else:
        frozen = 4 * (projection + embeddings)
    frozen += 4 * norms
    rank, targets = getattr(method_config, "rank", None), getattr(method_config, "targets", None)
    if rank and targets:
        trainable = m.layers * sum(rank * sum(linear[t]) for t in targets if t in linear)
    else:  # another method: its tensors are small next to the base; count 1 % of the projections
        trainable = projection // 100
    return PlanInputs(shape=m, frozen_bytes=frozen, trainable=trainable, projection_params=projection,
                      quantized=quantize != "none", recompute=recompute, loss_chunks=loss_chunks,
                      head_slices=head_slices if quantize != "none" else 0)


def candidates(config: dict, method_config, batch: int, seq: int, fixed: dict) -> list[Candidate]:
    """Every export the options allow (``fixed``: options the user gave, kept as given)."""
    out = []
    for q in ([fixed["quantize"]] if "quantize" in fixed else QUANTIZE):
        for r in ([fixed["recompute"]] if "recompute" in fixed else RECOMPUTE):
            for c in ([fixed["loss_chunks"]] if "loss_chunks" in fixed else LOSS_CHUNKS):
                slices = [fixed["head_slices"]] if "head_slices" in fixed else HEAD_SLICES if q != "none" else (0,)
                for h in slices:
                    out.append(Candidate(q, r, c, predict(inputs_from_config(config, method_config, q, r, c, h),
                                                          batch, seq), h))
    return out


def choose_export(config: dict, method_config, profile, batch: int, seq: int, fixed: dict) -> tuple[Candidate, str]:
    """The candidate to export for ``profile`` and one line saying why; ExportError when none fits."""
    all_ = candidates(config, method_config, batch, seq, fixed)
    fits = [c for c in all_ if c.prediction.peak_bytes <= profile.app_bytes]
    if not fits:
        best = min(all_, key=lambda c: c.prediction.peak_bytes)
        raise ExportError(
            f"no export of this model fits {profile.name} ({profile.app_mb} MB for an app) at --batch-size {batch} "
            f"--max-seq-len {seq}: the smallest, {best.label()}, is predicted to need "
            f"{best.prediction.peak_bytes / MB:.0f} MB; plan a smaller --batch-size or --max-seq-len, or a smaller model.")
    chosen = min(fits, key=lambda c: (c.prediction.flops, c.head_slices > 1, c.quantize != "int8", c.loss_chunks))
    left_out = sorted({c.recompute for c in all_ if c.prediction.flops < chosen.prediction.flops} - {chosen.recompute})
    why = (f"{chosen.label()}: predicted peak {chosen.prediction.peak_bytes / MB:.0f} MB of {profile.app_mb} MB on "
           f"{profile.name} at batch {batch} x {seq} tokens")
    if left_out:
        why += f"; faster recompute policies ({', '.join(left_out)}) would not fit"
    else:
        why += "; the fastest option fits"
    return chosen, why


def model_config(source: str | None) -> dict:
    """The config fields the plan reads, from the model source (workstation half: transformers)."""
    from transformers import AutoConfig

    from edgetune.export.sources import resolve_source

    resolved = resolve_source(source)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(resolved.folder, **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        raise ExportError(f"cannot read the model config of {resolved.model_id!r}: {exc}") from None
    return {k: getattr(config, k, None) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "head_dim",
                                                  "tie_word_embeddings")}
