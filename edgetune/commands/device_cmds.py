"""Device commands: ``devices list``, ``devices show NAME``, ``plan BUNDLE --device NAME``. No torch."""

from __future__ import annotations

from pathlib import Path

import click

MB = 1024 * 1024


@click.group()
def devices():
    """The device classes edgetune knows (profiles shipped in devices/)."""


@devices.command(name="list")
def list_cmd():
    """One line per shipped device profile."""
    from edgetune.devices.profile import load_profiles

    click.echo(f"{'name':<22} {'app memory':>10} {'RAM':>8} {'threads':>7} {'GFLOP/s':>8}  backends")
    for p in load_profiles().values():
        click.echo(f"{p.name:<22} {p.app_mb:>7} MB {p.ram_mb:>5} MB {p.threads:>7} {p.gflops:>8.0f}  "
                   f"{', '.join(p.backends)}{'  (ORT format)' if p.ort_format_required else ''}")


@devices.command()
@click.argument("name")
def show(name):
    """Everything a profile says, with the source of each figure."""
    from edgetune.devices.profile import get_profile

    p = get_profile(name)
    click.echo(f"{p.name}: {p.title}  ({p.path})")
    click.echo(f"  os / arch        {p.os} / {p.arch}, SIMD: {', '.join(p.simd) or 'none'}")
    click.echo(f"  cores / threads  {p.cores} / {p.threads} used for training")
    click.echo(f"  RAM              {p.ram_mb} MB")
    click.echo(f"  app may use      {p.app_mb} MB   source: {p.app_mb_source}")
    click.echo(f"  throughput       {p.gflops:g} GFLOP/s fp32   source: {p.gflops_source}")
    click.echo(f"  backends         {', '.join(p.backends)}")
    click.echo(f"  ORT format       {'required (minimal mobile builds)' if p.ort_format_required else 'not required'}")


def _sizes(text: str, option: str) -> tuple[int, ...]:
    from edgetune.errors import EdgetuneError

    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise EdgetuneError(f"{option} must be comma-separated positive integers, got {text!r}.")
    return values


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", required=True, help="A device profile name (`edgetune devices list`) or a .toml file.")
@click.option("--batches", default="1,2,4,8,16", show_default=True, help="Batch sizes to plan.")
@click.option("--seqs", default="64,128,256,512,1024", show_default=True, help="Sequence lengths to plan.")
def plan(bundle, device, batches, seqs):
    """Predicted peak memory and step time of BUNDLE's training step on DEVICE, per (batch, seq)."""
    from edgetune.bundle import Bundle
    from edgetune.devices.plan import grid, largest_fitting
    from edgetune.devices.profile import get_profile

    profile = get_profile(device)
    batches, seqs = _sizes(batches, "--batches"), _sizes(seqs, "--seqs")
    manifest = Bundle.open(bundle, verify=False).manifest
    predictions = grid(manifest, batches, seqs, profile.gflops)
    memory = manifest.producer.get("memory") or {}
    click.echo(f"{bundle} on {profile.name} ({profile.title}): app memory {profile.app_mb} MB, "
               f"{profile.gflops:g} GFLOP/s; bundle: {manifest.quantization} base, recompute "
               f"{memory.get('recompute', 'none')}, loss chunks {memory.get('loss_chunks', 1)}")
    click.echo(f"{'batch':>5} {'seq':>5} {'peak MB':>8} {'step s':>7} {'tokens/s':>9}  fits")
    for p in predictions:
        fits = p.peak_bytes <= profile.app_bytes
        click.echo(f"{p.batch:>5} {p.seq:>5} {p.peak_bytes / MB:>8.0f} {p.step_seconds:>7.2f} "
                   f"{p.tokens / p.step_seconds:>9.0f}  {'yes' if fits else 'no'}")
    best = largest_fitting(predictions, profile.app_bytes)
    if best is None:
        click.echo(f"nothing fits in {profile.app_mb} MB; export with --recompute full, --quantize int8 or more "
                   "--loss-chunks, or use a smaller model.")
    else:
        click.echo(f"largest that fits: --batch-size {best.batch} --max-seq-len {best.seq} "
                   f"(peak {best.peak_bytes / MB:.0f} MB of {profile.app_mb} MB, {best.step_seconds:.2f} s/step)")


COMMANDS = [devices, plan]
