"""``bench/run.py --compute-int8``: one more edgetune column, the same export with ``--compute int8``.

The second bundle is exported with the first one's options plus ``--compute int8`` (frozen
projections as int8 GEMMs on the int8 weights, export/compute_int8.py) and trained by the same
worker on the same batch and, when the real-data comparison runs, on the same real examples. Its
column ``int8 compute`` sits beside ``edgetune`` (fp32 compute) with the ratio int8/fp32. The
quality side (loss and gradient error, eval loss and exact match after training) is not timed
here: ``bench/int8_error.py`` and README, Performance.
"""

from __future__ import annotations

from pathlib import Path

NAME = "edgetune_int8"


def add_arguments(p) -> None:
    p.add_argument("--compute-int8", action="store_true",
                   help="also export with --compute int8 and add its column (needs --quantize int8; not with --bundle)")


def problems(args) -> list[str]:
    if not args.compute_int8:
        return []
    out = []
    if args.bundle is not None:
        out.append("--compute-int8 exports its own second bundle; drop --bundle.")
    if args.quantize != "int8":
        out.append(f"--compute-int8 needs --quantize int8, got --quantize {args.quantize}.")
    return out


def export_int8(args, tmp: Path, export) -> tuple[Path, dict]:
    """The bundle of ``export(args, tmp)`` (bench/run.py) with ``--compute int8``, in its own folder."""
    folder = tmp / "compute-int8"
    folder.mkdir(exist_ok=True)
    return export(args, folder, extra=["--compute", "int8"])


def measure(args, tmp: Path, export, worker, say, common: dict, real_args: dict | None, runs: dict, real: dict) -> dict | None:
    """Add the int8-compute trainer to ``runs`` (synthetic batch) and ``real`` (real data); its export record."""
    if not args.compute_int8:
        return None
    bundle, info = export_int8(args, tmp, export)
    say("edgetune training steps with --compute int8 (ort-training backend)")
    runs[NAME] = worker("edgetune", {**common, "bundle": str(bundle)})
    if real_args is not None:
        say("real data: edgetune packed, --compute int8")
        real[NAME] = worker("edgetune", {**real_args, "bundle": str(bundle)})
    return info
