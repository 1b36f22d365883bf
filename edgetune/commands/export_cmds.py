"""Workstation commands: ``export`` and ``inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click



def _targets(value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


@click.command()
@click.argument("model", required=False)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bundle"), show_default=True,
              help="Bundle folder to write (refused if it exists, unless --force).")
@click.option("--method", default="lora", show_default=True, help="Adaptation method.")
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha; scaling = alpha / r.")
@click.option("--targets", default="q_proj,v_proj", show_default=True, help="Comma-separated linear layers to adapt.")
@click.option("--rslora", is_flag=True, help="Rank-stabilised LoRA: scaling = alpha / sqrt(r).")
@click.option("--quantize", default="int8", show_default=True, help="Frozen base weights: int8 (per output channel) or none (fp32).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay (baked into the optimizer graph).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the initial LoRA A matrices.")
@click.option("--recompute", type=click.Choice(["full", "cheap", "mlp", "none"]), default="cheap", show_default=True,
              help="Activation recompute per residual block: full keeps only the block inputs (least memory); "
                   "cheap also keeps the frozen projections' outputs (fewer FLOPs); mlp is cheap in MLP "
                   "blocks and full in attention blocks; none keeps every activation.")
@click.option("--loss-chunks", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Compute the LM head and loss over label positions in this many chunks, so the "
                   "(tokens x vocabulary) logits never exist whole.")
@click.option("--no-memory-rewrites", is_flag=True,
              help="Keep the training graph exactly as ONNX Runtime's gradient builder writes it "
                   "(ignores --recompute and --loss-chunks; for comparisons).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def export(model, out, method, rank, alpha, targets, rslora, quantize, weight_decay, seed, recompute, loss_chunks,
           no_memory_rewrites, force):
    """Export MODEL (a Hugging Face folder, a .gguf file, or a built-in name; default smollm2-135m)
    with a trainable adapter into an ONNX Runtime training bundle."""
    from edgetune.export.artifacts import AdamWSettings
    from edgetune.export.exporter import ExportOptions, check_output, export_bundle
    from edgetune.methods import LoraConfig

    check_output(Path(out), force)  # before loading torch: a fast, clear refusal
    opts = ExportOptions(
        source=model, out=out, method=method,
        method_config=LoraConfig(rank=rank, alpha=alpha, targets=_targets(targets), use_rslora=rslora, seed=seed),
        quantize=quantize, force=force, adamw=AdamWSettings(weight_decay=weight_decay),
        recompute=recompute, loss_chunks=loss_chunks, memory_rewrites=not no_memory_rewrites,
    )
    manifest = export_bundle(opts, report=lambda msg: click.echo(f"• {msg}", err=True))
    click.echo(f"wrote {out} in {manifest.producer['export_seconds']} s", err=True)
    from edgetune.bundle import Bundle
    from edgetune.summary import bundle_summary

    click.echo(bundle_summary(Bundle.open(out, verify=False)))  # export just hashed every file


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the artifact files.")
def inspect(bundle, as_json, no_verify):
    """Show what a bundle holds: base model, method, tensors, quantization, files."""
    from edgetune.bundle import Bundle
    from edgetune.summary import bundle_summary

    opened = Bundle.open(bundle, verify=not no_verify)
    if as_json:
        click.echo(json.dumps(opened.manifest.to_dict(), indent=2))
    else:
        click.echo(bundle_summary(opened))


COMMANDS = [export, inspect]
