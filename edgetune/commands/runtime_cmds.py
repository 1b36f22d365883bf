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
BACKEND = click.option("--backend", default="auto", show_default=True,
                       help="Engine that runs the graphs: ort-training (ONNX Runtime's training build), portable "
                            "(stock onnxruntime), or auto (ort-training when installed, else portable).")


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
@click.option("--data", type=DATA_PATH, required=True, help="Training data, JSONL: instruction pairs, chats or text.")
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
@click.option("--eval-data", type=DATA_PATH, default=None, help="Held-out JSONL: report loss before and after.")
@click.option("--skip-bad", is_flag=True, help="Skip malformed lines and records (counted) instead of stopping.")
@BACKEND
@click.option("--quiet", is_flag=True, help="No progress bar.")
@THREADS
@STATE
@click.option("--device", default=None, help="Refuse, before the first step, a batch size and length predicted "
                                              "not to fit this device profile (`edgetune devices list`).")
@click.option("--emulate", default=None, help="Run here under this device profile's threads and a hard memory cap.")
@click.pass_context
def train(ctx, bundle, data, steps, epochs, batch_size, grad_accum, max_seq_len, lr, warmup, seed, save_every,
          resume, restart, eval_data, skip_bad, backend, quiet, threads, state_dir, device, emulate):
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
                        backend=backend, state_dir=state_dir)
    bundle = Bundle.open(bundle)  # hashed once, shared by the evaluations before and after
    if device is not None:  # before any data is read or a session built
        from edgetune.devices.fit import check_fits
        from edgetune.devices.profile import get_profile

        check_fits(bundle.manifest, get_profile(device), batch_size, max_seq_len, grad_accum)
    before = _eval(bundle, eval_data, batch_size, max_seq_len, threads, state_dir, skip_bad, backend) if eval_data else None
    result = run(bundle, opts, progress=not quiet, log=lambda m: click.echo(m, err=True))
    d = result.data
    click.echo(f"trained steps {result.start_step}..{result.steps}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
               if result.losses else f"nothing to do: the run is already at step {result.steps}")
    if result.losses:
        click.echo(f"{result.tokens:,} tokens in {result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s)")
    click.echo(f"data: {d['examples']} examples ({d['shape']}), {d['truncated']} truncated to {max_seq_len} tokens, "
               f"{d['skipped_bad']} bad lines skipped, {d['dropped_empty']} dropped with no label tokens")
    click.echo(f"checkpoint: {result.checkpoint}")
    if eval_data is not None:
        after = _eval(bundle, eval_data, batch_size, max_seq_len, threads, state_dir, skip_bad, backend)
        click.echo(f"eval loss: {before['with_adapter']['loss']:.4f} -> {after['with_adapter']['loss']:.4f} "
                   f"(perplexity {before['with_adapter']['perplexity']:.2f} -> {after['with_adapter']['perplexity']:.2f})")


def _eval(bundle, data, batch_size, max_seq_len, threads, state_dir, skip_bad, backend):
    from edgetune.runtime.evaluate import evaluate

    return evaluate(bundle, data, batch_size=batch_size, max_seq_len=max_seq_len, threads=threads,
                    state_dir=state_dir, skip_bad=skip_bad, backend_name=backend)


@click.command(name="eval")
@BUNDLE
@click.option("--data", type=DATA_PATH, required=True, help="Held-out JSONL (same shapes as training data).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-seq-len", type=int, default=256, show_default=True)
@click.option("--skip-bad", is_flag=True, help="Skip malformed lines instead of stopping.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@BACKEND
@THREADS
@STATE
def eval_cmd(bundle, data, batch_size, max_seq_len, skip_bad, as_json, backend, threads, state_dir):
    """Loss and perplexity on held-out DATA, with the latest adapter and without it."""
    from edgetune.bundle import Bundle

    backend = _backend(backend)
    _check_file(data, "--data")
    r = _eval(Bundle.open(bundle), data, batch_size, max_seq_len, threads, state_dir, skip_bad, backend)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    on, off = r["with_adapter"], r["without_adapter"]
    click.echo(f"{on['examples']} examples, {on['label_tokens']:,} label tokens; adapter: {r['adapter']}")
    click.echo(f"  with adapter     loss {on['loss']:.4f}  perplexity {on['perplexity']:.3f}")
    click.echo(f"  without adapter  loss {off['loss']:.4f}  perplexity {off['perplexity']:.3f}")


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
@THREADS
@STATE
def generate(bundle, prompt, system, max_new_tokens, temperature, top_p, seed, no_adapter, raw, threads, state_dir):
    """Answer PROMPT with the latest trained adapter (the answer alone on stdout)."""
    from edgetune.bundle import Bundle
    from edgetune.runtime.answer import answer

    text, origin = answer(Bundle.open(bundle), prompt, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, use_adapter=not no_adapter, raw=raw, threads=threads,
                          state_dir=state_dir)
    click.echo(f"[adapter: {origin}]", err=True)
    click.echo(text)


COMMANDS = [train, eval_cmd, generate]
