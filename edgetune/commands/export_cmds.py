"""Workstation commands: ``export`` and ``inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _method_options(command):
    """One click option per method config field that declares a flag (``edgetune.methods``).

    Options default to None so that only what the user gave reaches the config (the rest keep the
    method's defaults), and an option of another method than ``--method`` is refused by name.
    """
    from edgetune.methods import cli_options

    for option in reversed(cli_options()):
        help_text = f"[{', '.join(option.methods)}] {option.help}"
        if option.kind == "flag":
            command = click.option(option.flag, option.dest, is_flag=True, default=None, help=help_text)(command)
        elif option.kind == "choice":
            command = click.option(option.flag, option.dest, type=click.Choice(option.choices), default=None,
                                   help=help_text)(command)
        else:
            kind = {"int": int, "float": float, "list": str, "mapping": str}[option.kind]
            command = click.option(option.flag, option.dest, type=kind, default=None, help=help_text)(command)
    return command


def method_config(method: str, given: dict):
    """The config of ``method`` from the method options given (click dest -> value, None = not given)."""
    from edgetune.errors import ExportError
    from edgetune.methods import cli_options, get_method

    spec = get_method(method)
    chosen = {o.dest: o for o in cli_options()}
    given = {dest: value for dest, value in given.items()  # an absent flag arrives as False
             if value is not None and not (chosen[dest].kind == "flag" and value is False)}
    foreign = [chosen[dest].flag for dest in given if method not in chosen[dest].methods]
    if foreign:
        own = [o.flag for o in spec.config_class.cli_options()]
        raise ExportError(f"{', '.join(foreign)} do(es) not apply to --method {method}; "
                          f"its options are: {', '.join(own) or 'none'}.")
    return spec.config_class.from_cli({chosen[dest].field: value for dest, value in given.items()})


def _method_names() -> list[str]:
    from edgetune.methods import method_names

    return method_names()


def _methods_help() -> str:
    from edgetune.methods import get_method, method_names

    return "; ".join(f"{name}: {get_method(name).description}" for name in method_names())


def _head_slices(ctx, param, value) -> int | None:
    """``--head-slices``: ``auto`` -> None (the exporter decides per head), else a count >= 0."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if not 0 <= count <= 4096:
        raise click.BadParameter(f"expected auto or a whole number from 0 to 4096, got {value!r}.")
    return count


@click.command()
@click.argument("model", required=False)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bundle"), show_default=True,
              help="Bundle folder to write (refused if it exists, unless --force).")
@click.option("--method", type=click.Choice(_method_names()), default="lora", show_default=True,
              help=f"Adaptation method ({_methods_help()}); the options marked [method] below set its config.")
@_method_options
@click.option("--quantize", default="int8", show_default=True,
              help="Frozen base weights: int8 (per output channel), int4 (linear weights block-wise 4-bit, "
                   "the embedding int8; generation uses int8) or none (fp32; needed by --method full).")
@click.option("--block-size", type=int, default=64, show_default=True,
              help="--quantize int4: input rows sharing one scale (32, 64 or 128).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay (baked into the optimizer graph).")
@click.option("--recompute", type=click.Choice(["full", "cheap", "mlp", "none"]), default="cheap", show_default=True,
              help="Activation recompute per residual block: full keeps only the block inputs (least memory); "
                   "cheap also keeps the frozen projections' outputs (fewer FLOPs); mlp is cheap in MLP "
                   "blocks and full in attention blocks; none keeps every activation.")
@click.option("--loss-chunks", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Compute the LM head and loss over label positions in this many chunks, so the "
                   "(tokens x vocabulary) logits never exist whole.")
@click.option("--head-slices", default="auto", show_default=True, callback=_head_slices,
              help="Multiply the LM head in this many vocabulary slices, each dequantized right before its "
                   "product, instead of one fp32 copy of the whole head alive through the loss (int8 heads): "
                   "less memory, a little more time. auto slices heads whose fp32 copy exceeds 256 MB "
                   "(1B-class models) into pieces of at most 64 MB; 0 turns it off.")
@click.option("--no-memory-rewrites", is_flag=True,
              help="Keep the training graph exactly as ONNX Runtime's gradient builder writes it "
                   "(ignores --recompute and --loss-chunks; for comparisons).")
@click.option("--compute", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Arithmetic of the frozen projections: fp32 (exact) or int8 (GEMMs on the int8 weights, "
                   "activations and gradients quantized per row at run time; needs --quantize int8; "
                   "changes numbers: README, Performance).")
@click.option("--task", type=click.Choice(["causal-lm", "dpo", "sequence-classification"]), default="causal-lm",
              show_default=True,
              help="What the bundle trains: causal-lm (instructions, chats, text), dpo (preference pairs; "
                   "the reference model is the base with the adapter off) or sequence-classification (an encoder "
                   "such as all-minilm-l6-v2, mean-pooled, with a linear head; {\"text\", \"label\"} records).")
@click.option("--num-labels", type=int, default=None, help="sequence-classification: number of classes.")
@click.option("--labels", "label_names", default=None,
              help="sequence-classification: class names, comma-separated, in index order (default LABEL_0, LABEL_1, ...).")
@click.option("--beta", type=float, default=None, help="dpo: KL strength towards the reference [default: 0.1].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--device", default=None, help="Choose --quantize, --recompute, --loss-chunks and --head-slices (those not given) so "
                                             "training fits this device profile (`edgetune devices list`).")
@click.option("--plan-batch-size", type=click.IntRange(1), default=4, show_default=True,
              help="With --device: the batch size training there will use.")
@click.option("--plan-seq-len", type=click.IntRange(1), default=256, show_default=True,
              help="With --device: the --max-seq-len training there will use.")
@click.option("--ort-format", is_flag=True, help="Also write the training artifacts in ORT format (for minimal "
                                                 "mobile onnxruntime builds); the manifest records them.")
@click.pass_context
def export(ctx, model, out, method, quantize, block_size, weight_decay, recompute, loss_chunks, head_slices, no_memory_rewrites, compute, task, beta,
           num_labels, label_names, force, device, plan_batch_size, plan_seq_len, ort_format, **method_options):
    """Export MODEL (a Hugging Face folder, a .gguf file, or a built-in name; default smollm2-135m)
    with a trainable adapter into an ONNX Runtime training bundle."""
    from edgetune.export.artifacts import AdamWSettings
    from edgetune.export.exporter import ExportOptions, check_output, export_bundle

    config = method_config(method, method_options)  # before loading torch: fast, clear refusals
    check_output(Path(out), force)
    if device is not None:  # devices/export_choice.py: the plan for every candidate export
        from edgetune.devices.export_choice import choose_export, model_config
        from edgetune.devices.profile import get_profile

        profile = get_profile(device)
        given = {name: value for name, value in (("quantize", quantize), ("recompute", recompute),
                                                 ("loss_chunks", loss_chunks), ("head_slices", head_slices))
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
        if given.get("head_slices", 0) is None:  # --head-slices auto given explicitly: the chooser's 0 or 8
            del given["head_slices"]
        from types import SimpleNamespace

        from edgetune.export.exporter import head_slices_obstacle

        planned = SimpleNamespace(compute=compute, quantize=given.get("quantize", "int8"), task=task,
                                  memory_rewrites=not no_memory_rewrites, loss_chunks=given.get("loss_chunks", 8))
        if head_slices_obstacle(planned):  # no chunked fp32-compute int8 head: do not offer slices
            given.setdefault("head_slices", 0)
        chosen, why = choose_export(model_config(model), config, profile, plan_batch_size, plan_seq_len, given)
        quantize, recompute, loss_chunks = chosen.quantize, chosen.recompute, chosen.loss_chunks
        head_slices = chosen.head_slices
        click.echo(f"• for {profile.name}: {why}", err=True)
        if profile.ort_format_required and not ort_format:
            click.echo(f"• {profile.name} apps use minimal onnxruntime builds: adding --ort-format", err=True)
            ort_format = True
    opts = ExportOptions(
        source=model, out=out, method=method, method_config=config,
        quantize=quantize, block_size=block_size, force=force, adamw=AdamWSettings(weight_decay=weight_decay),
        recompute=recompute, loss_chunks=loss_chunks, memory_rewrites=not no_memory_rewrites, task=task, beta=beta,
        num_labels=num_labels,
        labels=None if label_names is None else tuple(x.strip() for x in label_names.split(",")),
        compute=compute, head_slices=head_slices,
    )
    manifest = export_bundle(opts, report=lambda msg: click.echo(f"• {msg}", err=True))
    click.echo(f"wrote {out} in {manifest.producer['export_seconds']} s", err=True)
    if ort_format:
        from edgetune.export.ort_format import write_ort_format

        record = write_ort_format(out)
        click.echo(f"• ORT format: {', '.join(record['files'].values())} and {record['required_operators']}", err=True)
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
