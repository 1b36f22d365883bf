"""Human-readable bundle summary (``edgetune inspect``, end of ``edgetune export``)."""

from __future__ import annotations

from edgetune.bundle import Bundle
from edgetune.methods import get_method


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def bundle_summary(bundle: Bundle) -> str:
    folder, m = bundle.folder, bundle.manifest
    trainable = sum(_numel(t.shape) for t in m.trainable)
    frozen = sum(_numel(t.shape) for t in m.frozen)
    base = m.base_model.get("parameters") or frozen  # the base model's own parameter count (full fine-tuning: all)
    quantized = sum(1 for t in m.frozen if t.quantization != "none")
    sizes = {name: (folder / name).stat().st_size for name in m.files}  # Bundle.open checked they exist
    spec = get_method(m.method["name"])
    method = spec.summary(spec.config(m))
    lines = [
        f"bundle      {folder}  (schema {m.schema_version})",
        f"base model  {m.base_model['id']}  [{m.base_model['model_type']}]  sha256 {m.base_sha256[:16]}…",
        f"task        {_task_text(m)}",
        f"method      {method}",
        f"trainable   {trainable:,} parameters in {len(m.trainable)} tensors ({100 * trainable / max(base, 1):.2f}% of the base)",
        f"frozen      {frozen:,} parameters; {quantized} of {len(m.frozen)} tensors {m.quantization if quantized else 'fp32'}",
        f"memory plan {memory_plan_text(m.producer)}",
        f"compute     {compute_text(m.producer)}",
        f"backends    {backends_text(m.portable)}",
        f"optimizer   AdamW betas={tuple(m.optimizer['betas'])} eps={m.optimizer['eps']:g} weight_decay={m.optimizer['weight_decay']:g}",
        f"inputs      " + ", ".join(f"{i.name} {i.dtype}[{','.join(map(str, i.dims))}]" for i in m.inputs) + f" -> {', '.join(m.outputs)}",
        f"tokenizer   {m.tokenizer.file}; chat template {'yes' if m.tokenizer.chat_template else 'no'}; stop ids {m.tokenizer.stop_token_ids}",
        f"generation  {m.generation.file if m.generation else '—'}" + (f" ({m.generation.num_layers} layers, KV cache)" if m.generation else ""),
        "files",
    ]
    lines += [f"  {name:<24} {human_bytes(size):>10}  {m.files[name][:12]}…" for name, size in sizes.items()]
    lines.append(f"  {'total':<24} {human_bytes(sum(sizes.values())):>10}")
    return "\n".join(lines)


def memory_plan_text(producer: dict) -> str:
    """The training graph's memory rewrites (manifest ``producer.memory``) in ``edgetune export``
    terms (README, Performance); also the bench table's."""
    if "memory" not in producer:
        return "not recorded (exported before edgetune recorded it)"
    plan = producer["memory"]
    if plan is None:
        return "none (--no-memory-rewrites)"
    loss = f"loss in {plan['loss_chunks']} chunks" if plan["loss_chunks"] > 1 else "loss in one piece"
    if plan.get("head_slices"):
        loss += f", LM head in {plan['head_slices']} vocabulary slices"
    return (f"--recompute {plan['recompute']} ({plan['recomputed_segments']} blocks recomputed), {loss}, "
            f"{plan['private_dequantize']} per-use dequantizations")


def compute_text(producer: dict) -> str:
    """How the frozen projections multiply (manifest ``producer.compute``; absent before it was recorded: fp32)."""
    plan = producer.get("compute") or {"matmul": "fp32"}
    if plan["matmul"] == "fp32":
        return "fp32 (exact)"
    return (f"int8 GEMMs on the int8 weights ({plan['forward']} forward, {plan['input_gradient']} input-gradient; "
            f"activations quantized {plan['activations']}); LoRA, loss and optimizer fp32")


def backends_text(portable: dict | None) -> str:
    """Which training backends the bundle supports (manifest ``portable``)."""
    if portable is None:
        return "ort-training (no portable graph: exported before edgetune wrote one)"
    if not portable["supported"]:
        ops = sorted({u["op_type"] for u in portable["unsupported"]})
        return f"ort-training (not portable: no standard-ONNX rewrite for {', '.join(ops)})"
    return f"ort-training, portable ({portable['file']}: stock onnxruntime)"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _task_text(m) -> str:
    """The task and its settings; a classifier shows its labels and pooling, not its tensor names."""
    config = m.task_config or {}
    if m.task == "sequence-classification":
        labels = config.get("labels") or []
        return (f"{m.task}: {len(labels)} labels ({', '.join(map(str, labels))}), {config.get('pooling')} pooling, "
                f"linear head {config.get('head')!r} trained whole")
    return m.task + "".join(f", {k} {v}" for k, v in config.items())
