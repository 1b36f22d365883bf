"""Device command ``sync``: one federated round against a collector. No torch on this path."""

from __future__ import annotations

from pathlib import Path

import click

PATH = click.Path(path_type=Path)


@click.command()
@click.argument("bundle", type=PATH)
@click.option("--server", required=True, help="Collector URL, e.g. http://127.0.0.1:8750.")
@click.option("--token", default=None, help="This device's token (from `edgetune collect devices add`).")
@click.option("--device-id", "device", default=None, help="This device's id as registered with the collector (`collect devices add ID`).")
@click.option("--sign", "sign_key", type=PATH, default=None,
              help="Ed25519 private key (`edgetune keygen`); a collector that trusts its public key needs no token.")
@click.option("--data", type=PATH, required=True, help="Training data on this device, JSONL.")
@click.option("--steps", type=int, default=None, help="Optimizer steps this round (default: one epoch).")
@click.option("--epochs", type=float, default=None, help="Epochs over the data instead of --steps.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--max-seq-len", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--warmup", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the batch order.")
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint every N steps (resume point).")
@click.option("--skip-bad", is_flag=True, help="Skip malformed lines instead of stopping.")
@click.option("--kind", type=click.Choice(["diff", "full"]), default="diff", show_default=True,
              help="Ship the difference from the round's global adapter, or the whole adapter.")
@click.option("--codec", type=click.Choice(["fp16", "int8", "fp32"]), default="fp16", show_default=True)
@click.option("--retries", type=click.IntRange(1, 50), default=6, show_default=True,
              help="Attempts per request (exponential back-off with jitter between them).")
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads (0 = all cores).")
@click.option("--state-dir", type=PATH, default=None, help="Training state folder (default: BUNDLE/train-state).")
@click.option("--sync-dir", type=PATH, default=None,
              help="Where the round's journal and files are kept (default: BUNDLE/sync-state).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sync(bundle, server, token, device, sign_key, data, steps, epochs, batch_size, grad_accum, max_seq_len, lr, warmup,
         seed, save_every, skip_bad, kind, codec, retries, threads, state_dir, sync_dir, quiet):
    """Take part in the collector's current round: pull its global adapter, train on DATA from it,
    push the update. Safe to re-run at any time: it finishes an interrupted round and never sends
    a different update under the same id."""
    from edgetune.errors import DataError
    from edgetune.federated.client import RetryPolicy
    from edgetune.federated.sync import SyncOptions, sync as run
    from edgetune.runtime.trainer import TrainOptions

    if not data.is_file():
        raise DataError(f"--data {str(data)!r} does not exist or is not a file; give a JSONL file.")
    train = TrainOptions(data=data, steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                         max_seq_len=max_seq_len, lr=lr, warmup=warmup, seed=seed, threads=threads,
                         save_every=save_every, skip_bad=skip_bad, state_dir=state_dir)
    opts = SyncOptions(server=server, train=train, token=token, device=device, sign=sign_key, kind=kind, codec=codec,
                       retry=RetryPolicy(attempts=retries), sync_dir=sync_dir)
    result = run(bundle, opts, log=lambda message: click.echo(message, err=True), progress=not quiet)
    click.echo(f"round {result.round}: {result.status} (update {result.update_id})")


COMMANDS = [sync]
