"""Delta commands: ``delta``, ``delta inspect``, ``to-peft``, ``from-peft``, ``merge``, ``keygen``."""

from __future__ import annotations

import json
from pathlib import Path

import click

PATH = click.Path(path_type=Path)


def _bundle_adapter(bundle: Path, state_dir: Path | None, checkpoint: str = "latest"):
    from edgetune.bundle import Bundle
    from edgetune.runtime.adapter_source import latest_adapter

    opened = Bundle.open(bundle)
    return opened.manifest, latest_adapter(opened, state_dir, checkpoint=checkpoint)


def _resolve(path: Path, manifest, since: Path | None, trusted: tuple[Path, ...]):
    """The full adapter ``path`` stands for, verified and fitted to the bundle (edgetune.delta.resolve)."""
    from edgetune.delta import load_public_keys, resolve_delta

    return resolve_delta(path, manifest, since=since, trusted_keys=load_public_keys(list(trusted)) if trusted else None)


def _spec(manifest):
    from edgetune.methods import get_method

    return get_method(manifest.method["name"])


def _exported(bundle: Path, manifest):
    """A callable giving the bundle's exported trainable tensors by PEFT key (read on first call only)."""
    cache: dict = {}

    def read() -> dict:
        if not cache:
            from edgetune.bundle import Bundle
            from edgetune.delta import AdapterTarget
            from edgetune.runtime.adapter_source import initial_adapter

            cache.update(AdapterTarget.of(manifest).by_peft(initial_adapter(Bundle.open(bundle, verify=False))))
        return cache

    return read


def _trained_by_peft(path: Path, manifest, since: Path | None, trusted: tuple[Path, ...], bundle: Path) -> dict:
    """The trained tensors (by PEFT key) a delta stands for: a method whose deltas are differences
    from the exported tensors (full fine-tuning) gets those added back."""
    return _spec(manifest).from_delta(_resolve(path, manifest, since, trusted).by_peft, _exported(bundle, manifest))


class _DeltaCommand(click.Command):
    """``delta BUNDLE --out F`` writes a delta; ``delta inspect FILE ...`` reads one."""

    def parse_args(self, ctx, args):
        if args[:1] == ["inspect"]:
            ctx.meta["inspect_args"] = args[1:]
            args = []
        return super().parse_args(ctx, args)


@click.command(cls=_DeltaCommand)
@click.argument("bundle", type=PATH, required=False)
@click.option("--out", type=PATH, help="Delta file to write (e.g. update.etd).")
@click.option("--codec", type=click.Choice(["fp16", "int8", "fp32"]), default="fp16", show_default=True)
@click.option("--since", type=PATH, default=None, help="Ship the difference from this delta (the round's global adapter).")
@click.option("--sign", "sign_key", type=PATH, default=None, help="Ed25519 private key from `edgetune keygen`.")
@click.option("--round", "round_id", default=None, help="Round id recorded in the delta.")
@click.option("--state-dir", type=PATH, default=None, help="Training state folder (default: BUNDLE/train-state).")
@click.option("--checkpoint", type=click.Choice(["latest", "best"]), default="latest", show_default=True,
              help="Ship the latest trained adapter, or the best by the held-out metric (train --eval-every).")
@click.pass_context
def delta(ctx, bundle, out, codec, since, sign_key, round_id, state_dir, checkpoint):
    """Write the trained adapter of BUNDLE as a compact, verifiable delta file.

    \b
    edgetune delta BUNDLE --out update.etd [--codec fp16|int8|fp32] [--since global.etd] [--sign device.key]
    edgetune delta inspect update.etd
    """
    if "inspect_args" in ctx.meta:
        delta_inspect.main(ctx.meta["inspect_args"], prog_name="edgetune delta inspect", standalone_mode=False)
        return
    if bundle is None or out is None:
        raise click.UsageError("give BUNDLE and --out, e.g. `edgetune delta bundle --out update.etd`.")
    from edgetune.delta import AdapterTarget, diff, load_private_key, read_delta, read_reference, write_delta

    manifest, adapter = _bundle_adapter(bundle, state_dir, checkpoint)
    target = AdapterTarget.of(manifest)
    tensors = _spec(manifest).to_delta(target.by_peft(adapter.tensors), _exported(bundle, manifest))
    kind, since_sha = "full", None
    if since is not None:
        reference = read_reference(since, target)
        tensors, kind, since_sha = diff(tensors, reference.tensors), "diff", reference.sha256
    trainer = adapter.trainer or {}
    metrics = {"loss": trainer["last_loss"]} if trainer.get("last_loss") is not None else {}
    write_delta(out, tensors, base_model_sha256=target.base_sha256, method=target.method, codec=codec,
                kind=kind, since_sha256=since_sha, num_examples=int(trainer.get("num_examples", 0)),
                round_id=round_id, metrics=metrics, signing_key=load_private_key(sign_key) if sign_key else None)
    written = read_delta(out)
    base_bytes = 4 * manifest.base_model.get("parameters", 0)
    against = f" ({100 * out.stat().st_size / base_bytes:.2f} % of the fp32 base, {base_bytes:,} bytes)" if base_bytes else ""
    relative = ", tensors are differences from the exported base" if _spec(manifest).delta_from_base else ""
    click.echo(f"wrote {out}: {kind} delta, {codec}, {out.stat().st_size:,} bytes{against}, adapter: {adapter.origin}"
               + relative + (f", signed by {written.signer_fingerprint}" if sign_key else ""))


@click.command(name="inspect")
@click.argument("path", type=PATH)
@click.option("--trusted-key", "trusted", type=PATH, multiple=True, help="Public key(s) a signature must come from.")
@click.option("--json", "as_json", is_flag=True)
def delta_inspect(path, trusted, as_json):
    """Show a delta's base hash, method, tensors, sizes, errors, metrics and signature status."""
    from edgetune.delta import describe, load_public_keys, read_delta

    delta_ = read_delta(path, trusted_keys=load_public_keys(list(trusted)) if trusted else None,
                        require_signature=bool(trusted))
    info = describe(delta_, path)
    click.echo(json.dumps(info, indent=2) if as_json else info["text"])


@click.command(name="to-peft")
@click.argument("delta_path", metavar="DELTA", type=PATH)
@click.option("--bundle", type=PATH, required=True, help="The bundle the delta was trained on.")
@click.option("--out", type=PATH, required=True, help="PEFT adapter folder to write.")
@click.option("--since", type=PATH, default=None, help="The delta a difference delta was made against.")
@click.option("--trusted-key", "trusted", type=PATH, multiple=True, help="Require a signature by one of these keys.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def to_peft(delta_path, bundle, out, since, trusted, force):
    """Convert DELTA into a PEFT adapter folder (adapter_config.json + adapter_model.safetensors);
    a bottleneck-adapter bundle's delta into AdapterHub's layout (adapter_config.json + adapter.safetensors)."""
    from edgetune.bundle import read_manifest
    from edgetune.methods import get_method
    from edgetune.peft_io import write_peft_adapter

    from edgetune.fixed_adapter import read_fixed_peft

    manifest = read_manifest(bundle)
    tensors = {**read_fixed_peft(bundle, manifest),  # FFA-LoRA: lora_A comes from the bundle
               **_trained_by_peft(delta_path, manifest, since, trusted, bundle)}
    write_peft_adapter(out, manifest, tensors, force=force)
    click.echo(f"wrote {out}: load with {get_method(manifest.method['name']).folder_load_hint.format(folder=str(out))}")


@click.command(name="from-peft")
@click.argument("folder", type=PATH)
@click.option("--bundle", type=PATH, required=True, help="Bundle whose training state starts from this adapter.")
@click.option("--state-dir", type=PATH, default=None, help="Training state folder (default: BUNDLE/train-state).")
@click.option("--force", is_flag=True, help="Replace a training run that is already in the state folder.")
def from_peft(folder, bundle, state_dir, force):
    """Import an adapter FOLDER saved by PEFT (or, for a bottleneck-adapter bundle, by AdapterHub's
    adapters with use_safetensors=True; for a full fine-tuning bundle, by `to-peft`) as the starting
    point of on-device training."""
    from edgetune.bundle import Bundle
    from edgetune.delta import AdapterTarget
    from edgetune.peft_io import read_peft_adapter
    from edgetune.runtime.import_adapter import import_adapter

    opened = Bundle.open(bundle)
    manifest = opened.manifest
    from edgetune.fixed_adapter import read_fixed_peft

    fixed = read_fixed_peft(opened.folder, manifest)
    tensors = AdapterTarget.of(manifest).by_graph(read_peft_adapter(folder, manifest, fixed=fixed))
    ckpt = import_adapter(opened, tensors, f"imported from PEFT {folder}", state_dir=state_dir, force=force)
    click.echo(f"imported {len(tensors)} tensors from {folder} into {ckpt}; `edgetune train {bundle} ...` starts from it")


@click.command()
@click.argument("bundle", type=PATH)
@click.option("--adapter", type=PATH, default=None, help="Delta to merge (default: the latest trained adapter).")
@click.option("--since", type=PATH, default=None, help="The delta a difference delta was made against.")
@click.option("--out", type=PATH, required=True, help="Merged inference graph to write (e.g. merged.onnx).")
@click.option("--state-dir", type=PATH, default=None)
def merge(bundle, adapter, since, out, state_dir):
    """Fold the adapter into the base weights (W' = W + scale * B @ A) of the inference graph."""
    from edgetune.merge import merge_adapter

    manifest, latest = _bundle_adapter(bundle, state_dir)
    if manifest.task == "sequence-classification":
        from edgetune.errors import EdgetuneError

        raise EdgetuneError(f"merge folds an adapter into a generation graph; {str(bundle)!r} is a sequence-classification "
                            "bundle, whose logits graph takes the adapter and head as inputs (`edgetune predict`).")
    if adapter is not None:
        from edgetune.delta import AdapterTarget

        tensors = AdapterTarget.of(manifest).by_graph(_trained_by_peft(adapter, manifest, since, (), bundle))
        origin = str(adapter)
    else:
        tensors, origin = latest.tensors, latest.origin
    merge_adapter(bundle, manifest, tensors, out)
    click.echo(f"wrote {out}: inference graph with the adapter ({origin}) folded in")


@click.command()
@click.option("--out", type=PATH, required=True, help="Private key file; the public key goes to OUT.pub.")
def keygen(out):
    """Create an Ed25519 key pair for signing deltas."""
    from edgetune.delta import fingerprint_file, generate_keypair

    generate_keypair(out)
    click.echo(f"wrote {out} (private, mode 600) and {out}.pub (public); fingerprint {fingerprint_file(Path(str(out) + '.pub'))}")


COMMANDS = [delta, to_peft, from_peft, merge, keygen]
