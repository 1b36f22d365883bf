"""``edgetune collect``: init a store from a bundle, register devices, serve, status, export."""

from __future__ import annotations

import json
from pathlib import Path

import click

PATH = click.Path(path_type=Path)
STORE = click.option("--store", type=PATH, required=True, help="The collector's store folder.")


@click.group()
def collect():
    """Collect deltas from devices and aggregate them into the next global adapter.

    \b
    edgetune collect init --bundle bundle --store fleet/
    edgetune collect devices add phone-17 --store fleet/ [--public-key device.key.pub]
    edgetune collect serve --store fleet/ --port 8750 --min-updates 10 --round-timeout 3600
    edgetune collect status --store fleet/ [--json]
    edgetune collect export --store fleet/ --round latest --peft global-adapter/ --bundle bundle
    """


@collect.command()
@click.option("--bundle", type=PATH, required=True, help="The bundle the devices train (its initial adapter is round 0).")
@STORE
def init(bundle, store):
    """Create a store: round 0 = the bundle's initial adapter; records base hash, method, tensor layout."""
    from edgetune.federated.bundle_io import init_store

    s = init_store(bundle, store)
    click.echo(f"created store {store}: base model {s.meta('base_model_sha256')[:16]}…, method "
               f"{s.meta('method')['name']}, {len(s.meta('layout'))} tensors ({s.meta('space')} aggregation); "
               f"round 0 global {s.current_round().global_sha256[:16]}…")


@collect.group()
def devices():
    """Register devices that may upload."""


@devices.command(name="add")
@click.argument("device_id")
@STORE
@click.option("--public-key", type=PATH, default=None,
              help="Trust this Ed25519 public key (.pub from `edgetune keygen`) instead of issuing a token.")
def devices_add(device_id, store, public_key):
    """Register DEVICE_ID; prints its one-time token (only its hash is stored), or trusts its key."""
    import secrets

    from edgetune.delta import load_public_key
    from edgetune.delta.signing import fingerprint, raw_public
    from edgetune.errors import EdgetuneError
    from edgetune.federated.collector import DEVICE_ID, token_hash
    from edgetune.federated.store import Store

    if not DEVICE_ID.fullmatch(device_id):
        raise EdgetuneError(f"device id {device_id!r}: use letters, digits and ._:- (at most 128, starting with a "
                            "letter or digit).")
    s = Store(store)
    if public_key is not None:
        key = load_public_key(public_key)
        s.add_device(device_id, None, raw_public(key).hex())
        click.echo(f"registered {device_id} with key {fingerprint(key)}: it uploads deltas signed with "
                   "`edgetune delta --sign`, without a token")
        return
    token = secrets.token_urlsafe(32)
    s.add_device(device_id, token_hash(token), None)
    click.echo(f"registered {device_id}; its token (shown once, only its hash is stored):")
    click.echo(token)


@collect.command()
@STORE
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8750, show_default=True)
@click.option("--min-updates", type=int, default=2, show_default=True, help="Aggregate when a round has this many updates.")
@click.option("--round-timeout", type=float, default=None, help="Seconds from a round's opening to its deadline.")
@click.option("--min-at-deadline", type=int, default=1, show_default=True,
              help="At the deadline, aggregate when at least this many updates arrived.")
@click.option("--aggregator", type=click.Choice(["fedavg", "median", "trimmed-mean"]), default="fedavg", show_default=True)
@click.option("--trim", type=float, default=0.1, show_default=True, help="trimmed-mean: fraction cut at each end.")
@click.option("--max-norm", type=float, default=None, help="Bound on the L2 norm of an update's change.")
@click.option("--norm-policy", type=click.Choice(["clip", "refuse"]), default="refuse", show_default=True)
@click.option("--max-late", type=int, default=0, show_default=True, help="Accept updates up to N rounds late.")
@click.option("--late-discount", type=float, default=0.5, show_default=True, help="Weight x F per round late.")
@click.option("--max-examples", type=int, default=None, help="Refuse updates claiming more training examples.")
@click.option("--dp-noise-multiplier", type=float, default=None, help="Server-side DP: Gaussian noise / clip norm.")
@click.option("--dp-clip", type=float, default=None, help="Server-side DP: per-update L2 clip norm.")
@click.option("--dp-delta", type=float, default=1e-5, show_default=True, help="The delta of the reported (eps, delta).")
@click.option("--max-upload-bytes", type=int, default=32 << 20, show_default=True)
@click.option("--upload-timeout", type=float, default=60.0, show_default=True, help="Seconds a client may take to send a body.")
@click.option("--tls-cert", type=PATH, default=None, help="Serve HTTPS with this certificate (PEM).")
@click.option("--tls-key", type=PATH, default=None, help="The certificate's private key (PEM).")
def serve(store, host, port, min_updates, round_timeout, min_at_deadline, aggregator, trim, max_norm, norm_policy,
          max_late, late_discount, max_examples, dp_noise_multiplier, dp_clip, dp_delta, max_upload_bytes,
          upload_timeout, tls_cert, tls_key):
    """Serve the store over HTTP until interrupted (Ctrl-C)."""
    from edgetune.errors import EdgetuneError
    from edgetune.federated.admission import AdmissionPolicy
    from edgetune.federated.aggregate import AggregationOptions
    from edgetune.federated.collector import ServeOptions
    from edgetune.federated.privacy import DPOptions
    from edgetune.federated.server import serve as run

    if (dp_noise_multiplier is None) != (dp_clip is None):
        raise EdgetuneError("server-side DP needs both --dp-noise-multiplier and --dp-clip.")
    if (tls_cert is None) != (tls_key is None):
        raise EdgetuneError("HTTPS needs both --tls-cert and --tls-key.")
    dp = DPOptions(dp_noise_multiplier, dp_clip, dp_delta) if dp_clip is not None else None
    options = ServeOptions(min_updates=min_updates, min_at_deadline=min_at_deadline, round_timeout=round_timeout,
                           aggregation=AggregationOptions(aggregator, trim, dp=dp),
                           policy=AdmissionPolicy(max_norm, norm_policy, max_late, late_discount, max_examples),
                           max_upload_bytes=max_upload_bytes, upload_timeout=upload_timeout)
    scheme = "https" if tls_cert else "http"

    def ready(collector):
        info = collector.round_info()
        click.echo(f"serving {store} on {scheme}://{host}:{port} (round {info['round']}, {info['accepted']} update(s) "
                   f"so far; aggregating at {min_updates} with {aggregator}); Ctrl-C stops", err=True)

    run(store, options, host, port, tls_cert=tls_cert, tls_key=tls_key, on_ready=ready)


@collect.command()
@STORE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(store, as_json):
    """Rounds, updates accepted and refused (with reasons), per-round metrics."""
    from edgetune.federated.status import status as summary, status_text
    from edgetune.federated.store import Store

    s = summary(Store(store))
    click.echo(json.dumps(s, indent=2) if as_json else status_text(s))


@collect.command(name="export")
@STORE
@click.option("--round", "which", default="latest", show_default=True, help="`latest` or a round number.")
@click.option("--peft", type=PATH, default=None, help="Write the global adapter as a PEFT folder here.")
@click.option("--bundle", type=PATH, default=None, help="The store's bundle (needed for --peft).")
@click.option("--delta", "delta_out", type=PATH, default=None, help="Write the global adapter as a .etd delta here.")
@click.option("--force", is_flag=True, help="Replace an existing --peft folder.")
def export(store, which, peft, bundle, delta_out, force):
    """Write a round's global adapter as a PEFT folder (PeftModel.from_pretrained loads it) or a delta."""
    from edgetune.atomic import atomic_write_bytes
    from edgetune.errors import EdgetuneError
    from edgetune.federated.bundle_io import export_peft, round_number
    from edgetune.federated.store import Store

    if peft is None and delta_out is None:
        raise EdgetuneError("give --peft FOLDER (with --bundle) or --delta FILE.")
    if peft is not None and bundle is None:
        raise EdgetuneError("--peft needs --bundle, the bundle the store was made from.")
    s = Store(store)
    n = round_number(s, which)
    if peft is not None:
        export_peft(s, n, bundle, peft, force=force)
        click.echo(f"wrote {peft}: round {n}'s global adapter; load with peft.PeftModel.from_pretrained(base, "
                   f"{str(peft)!r})")
    if delta_out is not None:
        if delta_out.exists() and not force:
            raise EdgetuneError(f"{delta_out} exists; pass --force to replace it or choose another --delta.")
        atomic_write_bytes(delta_out, s.read_blob(s.round(n).global_blob))
        click.echo(f"wrote {delta_out}: round {n}'s global adapter (full delta, fp32)")


COMMANDS = [collect]
