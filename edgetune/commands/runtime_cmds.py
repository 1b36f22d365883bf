"""Device commands: ``train``, ``eval``, ``generate``. No torch is imported on this path."""

from __future__ import annotations

import json
from pathlib import Path

import click

BUNDLE = click.argument("bundle", type=click.Path(path_type=Path))
THREADS = click.option("--threads", type=int, default=0, show_default=True, help="CPU threads (0 = all cores).")
STATE = click.option("--state-dir", type=click.Path(path_type=Path), default=None,
                     help="Training state folder (default: BUNDLE/train-state).")
DATA_PATH = click.Path(exists=False, path_type=Path)
CHECKPOINT = click.option("--checkpoint", type=click.Choice(["latest", "best"]), default="latest", show_default=True,
                          help="Which trained adapter: the latest checkpoint, or the best by the held-out metric "
                               "(written by train --eval-data --eval-every).")
BACKEND = click.option("--backend", default="auto", show_default=True,
                       help="Engine that runs the graphs: ort-training (ONNX Runtime's training build), portable "
                            "(stock onnxruntime), or auto (ort-training when installed, else portable).")


# What predict reads: the logits graph, the tokenizer, the exported adapter and head, fixed adapter tensors.
PREDICT_ROLES = ("classifier", "tokenizer", "checkpoint", "fixed_adapter")


def _backend(name: str) -> str:
    """``--backend`` checked before the bundle is hashed or any data is read."""
    from edgetune.runtime.backend import choose_backend

    return choose_backend(name)


def _check_file(path: Path, option: str) -> None:
    from edgetune.errors import DataError

    if not path.is_file():
        raise DataError(f"{option} {str(path)!r} does not exist or is not a file; give a JSONL file.")


@click.command()
@BUNDLE
@click.option("--data", type=DATA_PATH, required=True, help="Training data, JSONL: instruction pairs, chats or text; preference pairs (dpo); "
                   "{\"text\", \"label\"} (sequence-classification).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, default=None, help="Epochs over the data instead of --steps.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-seq-len", type=int, default=256, show_default=True, help="Longer examples are truncated (and counted).")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate.")
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warm-up steps; then linear decay to 0.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the batch order.")
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint every N steps (and at the end).")
@click.option("--resume", is_flag=True, help="Continue the run in the state folder from its last checkpoint.")
@click.option("--restart", is_flag=True, help="Discard the state folder and start from the bundle's adapter.")
@click.option("--eval-data", type=DATA_PATH, default=None, help="Held-out JSONL: report the task's metrics before and after.")
@click.option("--eval-every", type=int, default=None,
              help="Also evaluate --eval-data every N steps (and after the last); keeps the best adapter beside the latest.")
@click.option("--early-stop", type=int, default=None,
              help="Stop after K evaluations in a row without improvement (with --eval-data; evaluates every "
                   "--save-every steps unless --eval-every is given).")
@click.option("--skip-bad", is_flag=True, help="Skip malformed lines and records (counted) instead of stopping.")
@click.option("--packing/--no-packing", default=None,
              help="Pack several examples into each row of --max-seq-len tokens, attention kept within each "
                   "example (default: on for instruction and chat data). --batch-size then counts rows.")
@click.option("--group-by-length", is_flag=True, help="Unpacked: batch examples of similar length (less padding).")
@BACKEND
@click.option("--quiet", is_flag=True, help="No progress bar.")
@THREADS
@STATE
@click.option("--device", default=None, help="Refuse, before the first step, a batch size and length predicted "
                                              "not to fit this device profile (`edgetune devices list`).")
@click.option("--emulate", default=None, help="Run here under this device profile's threads and a hard memory cap.")
@click.pass_context
def train(ctx, bundle, data, steps, epochs, batch_size, grad_accum, max_seq_len, lr, warmup, seed, save_every,
          resume, restart, eval_data, eval_every, early_stop, skip_bad, packing, group_by_length, backend, quiet, threads,
          state_dir, device, emulate):
    """Fine-tune the bundle's adapter on DATA, on this device. Checkpoints are crash-safe."""
    from edgetune.bundle import Bundle
    from edgetune.runtime.trainer import TrainOptions, train as run

    if emulate is not None:  # the same command in a child under the profile's limits (devices/emulate.py)
        from edgetune.devices.emulate import emulate_train

        return emulate_train(ctx, emulate, bundle, state_dir)
    backend = _backend(backend)
    _check_file(data, "--data")
    if eval_data is not None:
        _check_file(eval_data, "--eval-data")
    opts = TrainOptions(data=data, steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                        max_seq_len=max_seq_len, lr=lr, warmup=warmup, seed=seed, threads=threads,
                        save_every=save_every, resume=resume, restart=restart, skip_bad=skip_bad,
                        backend=backend, state_dir=state_dir,
                        eval_data=eval_data if (eval_every or early_stop) else None, eval_every=eval_every,
                        early_stop=early_stop, packing=packing, group_by_length=group_by_length)
    bundle = Bundle.open(bundle)  # hashed once, shared by the evaluations before and after
    from edgetune.runtime.cpu_features import int8_compute_warning

    warning = int8_compute_warning(bundle.manifest.producer)
    if warning:
        click.echo(warning, err=True)
    if device is not None:  # before any data is read or a session built
        from edgetune.devices.fit import check_fits
        from edgetune.devices.profile import get_profile

        check_fits(bundle.manifest, get_profile(device), batch_size, max_seq_len, grad_accum)
    before = _eval(bundle, eval_data, batch_size, max_seq_len, threads, state_dir, skip_bad, backend) if eval_data else None
    result = run(bundle, opts, progress=not quiet, log=lambda m: click.echo(m, err=True))
    d = result.data
    end = result.stopped_early_at or result.steps
    click.echo(f"trained steps {result.start_step}..{end}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
               + (f" (stopped early; {result.steps} planned)" if result.stopped_early_at else "")
               if result.losses else f"nothing to do: the run is already at step {end}")
    if result.losses:
        click.echo(f"{result.tokens:,} tokens in {result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s)")
        click.echo(f"batches: {result.layout}; efficiency {100 * result.efficiency:.1f} % "
                   f"({result.tokens:,} real tokens / {result.row_tokens:,} row tokens)")
    click.echo(f"data: {d['examples']} examples ({d['shape']}), {d['truncated']} truncated to {max_seq_len} tokens, "
               f"{d['skipped_bad']} bad lines skipped, {d['dropped_empty']} dropped with no label tokens")
    for note in d.get("notes", []):  # e.g. classification: class counts, imbalance
        click.echo(f"data: {note}")
    click.echo(f"checkpoint: {result.checkpoint}")
    if result.best is not None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in (result.best["metrics"] or {}).items() if k in _SHOWN)
        click.echo(f"best: step {result.best['step']} ({shown}): {result.best['folder']}")
    if eval_data is not None:
        after = _eval(bundle, eval_data, batch_size, max_seq_len, threads, state_dir, skip_bad, backend)
        b, a = before["with_adapter"], after["with_adapter"]
        click.echo("eval " + "; ".join(f"{k}: {b[k]:.4f} -> {a[k]:.4f}" for k in a if k in _SHOWN))


def _refuse_classifier(opened, command: str) -> None:
    """A sequence-classification bundle has no text generation: say so, and what it has instead."""
    from edgetune.errors import EdgetuneError

    if opened.manifest.task == "sequence-classification":
        raise EdgetuneError(f"{command} needs a causal-LM bundle; {str(opened.folder)!r} is a sequence-classification "
                            "bundle (an encoder with a head): use `edgetune predict BUNDLE --text ...`.")


# Metrics printed by train and eval (the --json output has every number).
_SHOWN = ("loss", "perplexity", "accuracy", "macro_f1", "margin", "logp_accuracy")


def _eval(bundle, data, batch_size, max_seq_len, threads, state_dir, skip_bad, backend, checkpoint="latest"):
    from edgetune.runtime.evaluate import evaluate

    return evaluate(bundle, data, batch_size=batch_size, max_seq_len=max_seq_len, threads=threads,
                    state_dir=state_dir, skip_bad=skip_bad, backend_name=backend, checkpoint=checkpoint)


@click.command(name="eval")
@BUNDLE
@click.option("--data", type=DATA_PATH, required=True, help="Held-out JSONL (same shapes as training data).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-seq-len", type=int, default=256, show_default=True)
@click.option("--skip-bad", is_flag=True, help="Skip malformed lines instead of stopping.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@BACKEND
@CHECKPOINT
@THREADS
@STATE
def eval_cmd(bundle, data, batch_size, max_seq_len, skip_bad, as_json, backend, checkpoint, threads, state_dir):
    """The task's metrics on held-out DATA (causal-lm: loss, perplexity; dpo: preference accuracy,
    reward margin; sequence-classification: accuracy, macro-F1, per-class precision and recall),
    with the trained adapter and without it."""
    from edgetune.bundle import Bundle

    backend = _backend(backend)
    _check_file(data, "--data")
    r = _eval(Bundle.open(bundle), data, batch_size, max_seq_len, threads, state_dir, skip_bad, backend, checkpoint)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    on, off = r["with_adapter"], r["without_adapter"]
    tokens = f", {on['label_tokens']:,} label tokens" if "label_tokens" in on else ""
    click.echo(f"{int(on['examples'])} examples{tokens}; task {r['task']}; adapter: {r['adapter']}")
    for note in (r.get("data") or {}).get("notes", []):
        click.echo(f"  data: {note}")
    for label, m in (("with adapter   ", on), ("without adapter", off)):
        click.echo(f"  {label}  " + "  ".join(f"{k} {m[k]:.4f}" for k in m if k in _SHOWN))
    per_class = [k.partition("/")[2] for k in on if k.startswith("precision/")]
    if per_class:  # classification: precision and recall of each class, with the adapter
        click.echo("  per class (with adapter): " + "; ".join(
            f"{name} precision {on[f'precision/{name}']:.3f} recall {on[f'recall/{name}']:.3f}" for name in per_class))


@click.command()
@BUNDLE
@click.option("--prompt", required=True, help="The user message (rendered with the bundle's chat template).")
@click.option("--system", default=None, help="Optional system message.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (with --temperature > 0).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-adapter", is_flag=True, help="Generate with the base model only.")
@click.option("--raw", is_flag=True, help="Use the prompt as is, without the chat template.")
@click.option("--compute", type=click.Choice(["exact", "int8"]), default="exact", show_default=True,
              help="int8: integer products on the int8 weights (faster; the logits move, see README), "
                   "exact: fp32 products, the same numbers as the fp32 weights.")
@CHECKPOINT
@THREADS
@STATE
def generate(bundle, prompt, system, max_new_tokens, temperature, top_p, seed, no_adapter, raw, compute, checkpoint,
             threads, state_dir):
    """Answer PROMPT with the latest trained adapter (the answer alone on stdout)."""
    from edgetune.bundle import GENERATE_ROLES, Bundle
    from edgetune.runtime.answer import answer

    opened = Bundle.open(bundle, verify=GENERATE_ROLES)  # hashes only the files generate reads
    _refuse_classifier(opened, "generate")
    text, origin = answer(opened, prompt, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, use_adapter=not no_adapter, raw=raw, threads=threads,
                          state_dir=state_dir, checkpoint=checkpoint, compute=compute)
    click.echo(f"[adapter: {origin}]", err=True)
    click.echo(text)


@click.command()
@BUNDLE
@click.option("--text", "texts", multiple=True, required=True, help="Text to classify (repeat for several).")
@click.option("--json", "as_json", is_flag=True, help="Print label and probabilities as JSON, one object per text.")
@click.option("--no-adapter", is_flag=True, help="Use the bundle as exported (no training).")
@click.option("--max-seq-len", type=int, default=256, show_default=True, help="Longer texts are truncated.")
@CHECKPOINT
@THREADS
@STATE
def predict(bundle, texts, as_json, no_adapter, max_seq_len, checkpoint, threads, state_dir):
    """Classify TEXT with a sequence-classification bundle: the label and every label's probability."""
    from edgetune.bundle import Bundle
    from edgetune.errors import EdgetuneError
    from edgetune.runtime.adapter_source import initial_adapter, latest_adapter
    from edgetune.runtime.classification import predict as classify

    opened = Bundle.open(bundle, verify=PREDICT_ROLES)  # hashes only the files predict reads
    if opened.manifest.task != "sequence-classification":
        raise EdgetuneError(f"predict needs a sequence-classification bundle; {str(bundle)!r} trains "
                            f"{opened.manifest.task} (use `edgetune generate` for causal-lm bundles).")
    if max_seq_len < 2:
        raise EdgetuneError(f"--max-seq-len must be at least 2, got {max_seq_len}.")
    if no_adapter:
        tensors, origin = initial_adapter(opened), "bundle's initial adapter"
    else:
        source = latest_adapter(opened, state_dir, checkpoint=checkpoint)
        tensors, origin = source.tensors, source.origin
    results = classify(opened, list(texts), tensors, threads=threads, max_seq_len=max_seq_len)
    click.echo(f"[adapter: {origin}]", err=True)
    for r in results:
        if as_json:
            click.echo(json.dumps({**r, "adapter": origin}))
        else:
            probs = "  ".join(f"{name} {p:.3f}" for name, p in r["probabilities"].items())
            click.echo(f"{r['label']}\t{probs}")


COMMANDS = [train, eval_cmd, generate, predict]
