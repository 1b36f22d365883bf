"""``bench/run.py --sizes 135m,360m,1b``: how peak RSS and step time grow with the model.

For each size (bench/model_configs.py): the 135m is the built-in default model (real weights); the
others are Llama-shaped models of the published configs with seeded random weights, built once
into ``--models-dir``. Each is exported with an int8 and an int4 (``--block-size 64``) base, LoRA
r=8 alpha=16 on q_proj,v_proj, and trained for a few steps on the fixed random batch
(``--batch-size`` x ``--seq-len``, default 4 x 128) by edgetune (one process per base) and by
PyTorch+PEFT (fp32, as a user would run it), each in its own process: peak RSS is the kernel's
count for that process. The export's own peak RSS and time are recorded too.

Big models need several GB: before each build, export and PyTorch run the bench waits until the
machine has the job's estimated memory plus ``RESERVE`` free, and records a cell that cannot
start (or fails) as an error without stopping the rest.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from bench import sizes as bundle_sizes
from bench.model_configs import CONFIGS, DEFAULT_SIZE, SIZES, parameter_count
from bench.spawn import ChildFailed, run_child, worker

HERE = Path(__file__).resolve().parent
GB = 1e9
RESERVE = 6 * GB  # memory left to everything else on the machine
# Estimated peak of each job per fp32 byte of the model, from /usr/bin/time -v: the int4 export of
# the 360m peaked at 5.5x before the exporter stopped keeping its fp32 initializers (tracing a
# < 2 GB model holds three serialized copies of it; over 2 GB torch writes external data instead);
# the safetensors weights are memory-mapped, so part of what is counted is reclaimable page cache.
NEED_PER_FP32_BYTE = {"build": 0.5, "export": 2.0, "torch": 1.5, "edgetune": 0.5}
WAIT_S, POLL_S = 2400, 15


def parse_model_sizes(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SIZES]
    if not names or unknown:
        raise SystemExit(f"bench: --sizes takes a comma-separated list of {', '.join(SIZES)}; got {text!r}.")
    return names


def wait_for_memory(need: float, what: str, say) -> None:
    """Block until ``need`` bytes + RESERVE are available; raise ChildFailed after WAIT_S."""
    import psutil

    deadline = time.monotonic() + WAIT_S
    while (free := psutil.virtual_memory().available) < need + RESERVE:
        if time.monotonic() > deadline:
            raise ChildFailed(f"{what}: needs ~{need / GB:.1f} GB + {RESERVE / GB:.0f} GB reserve, "
                              f"{free / GB:.1f} GB available after {WAIT_S} s")
        say(f"{what}: waiting for memory ({free / GB:.1f} GB available, ~{(need + RESERVE) / GB:.1f} GB wanted)")
        time.sleep(POLL_S)


def trainer_cell(r: dict, tokens: int) -> dict:
    step = statistics.median(r["times"])
    return {"step_s": step, "step_times_s": r["times"], "tokens_per_s": tokens / step, "first_loss": r["losses"][0],
            "peak_rss_bytes": r["peak_rss_bytes"], "load_peak_rss_bytes": r.get("load_high_water_bytes"),
            "rss_before_steps_bytes": r["rss_before_steps_bytes"], "steps_peak_rss_bytes": r.get("steps_high_water_bytes"),
            "other_cores": r["other_cores"], **{k: r[k] for k in ("torch_imported",) if k in r}}


def attempt(fn, what: str, say) -> dict:
    try:
        return fn()
    except ChildFailed as exc:  # out of memory, a failed export: record it, keep going
        say(f"{what} failed: {str(exc).splitlines()[0]}")
        return {"error": str(exc).splitlines()[0][:500]}


def model_source(size: str, models_dir: Path, say) -> tuple[str | None, dict | None]:
    """(the --model argument, the build's record); None for the built-in default model."""
    if size == DEFAULT_SIZE:
        return None, None
    name = SIZES[size]
    out = models_dir / name
    wait_for_memory(NEED_PER_FP32_BYTE["build"] * 4 * parameter_count(CONFIGS[name]), f"building {name}", say)
    say(f"building {name} (random weights) into {out}")
    run = run_child([sys.executable, str(HERE / "model_configs.py"), "build", name, str(out)], parse_result=False)
    return str(out), {"seconds": run["wall_s"], "peak_rss_bytes": run["ru_maxrss_bytes"]}


def export_bundle(model: str | None, quantize: str, out: Path, fp32_bytes: int, lora: dict, say,
                  recompute: str = "cheap") -> dict:
    wait_for_memory(NEED_PER_FP32_BYTE["export"] * fp32_bytes, f"export {quantize}", say)
    argv = [sys.executable, "-m", "edgetune.cli", "export", *([model] if model else []), "--out", str(out),
            "--quantize", quantize, *(["--block-size", "64"] if quantize == "int4" else []),
            "--rank", str(lora["rank"]), "--alpha", str(lora["alpha"]), "--targets", lora["targets"],
            "--recompute", recompute, "--force"]
    say(f"exporting {model or 'the default model'} --quantize {quantize}")
    run = run_child(argv, parse_result=False)
    return {"seconds": run["wall_s"], "peak_rss_bytes": run["ru_maxrss_bytes"],
            "bundle_bytes": bundle_sizes.bundle_bytes(out)["total"], "command": "edgetune " + " ".join(argv[3:])}


def run_growth(args, tmp: Path, lora: dict, say) -> list[dict]:
    """One row per model size: the build, both exports, edgetune per base, and PyTorch+PEFT."""
    from edgetune.bundle import read_manifest

    rows = []
    common = {"batch": args.batch_size, "seq": args.seq_len, "threads": args.threads, "steps": args.steps,
              "warmup": args.warmup, "prompt_fraction": args.prompt_fraction}
    tokens = args.batch_size * args.seq_len
    for size in parse_model_sizes(args.sizes):
        name = SIZES[size]
        fp32_bytes = 4 * parameter_count(CONFIGS[name])
        row = {"size": size, "model": name, "parameters": parameter_count(CONFIGS[name]),
               "weights": "real (built-in GGUF)" if size == DEFAULT_SIZE else "random (published config)",
               "exports": {}, "edgetune": {}, "pytorch_peft": None}
        try:
            model, row["build"] = model_source(size, args.models_dir, say)
        except ChildFailed as exc:
            row["build"] = {"error": str(exc).splitlines()[0][:500]}
            rows.append(row)
            continue
        manifest = None
        for quantize in args.size_quantize.split(","):
            out = tmp / f"{name}-{quantize}"
            row["exports"][quantize] = attempt(
                lambda: export_bundle(model, quantize, out, fp32_bytes, lora, say, args.recompute),
                f"{name} export {quantize}", say)
            if "error" in row["exports"][quantize]:
                continue
            manifest = read_manifest(out, verify=False)
            say(f"{name} {quantize}: edgetune training steps")
            row["edgetune"][quantize] = attempt(
                lambda: trainer_cell(worker("edgetune", {**common, "bundle": str(out)}), tokens), f"{name} edgetune", say)
            for f in sorted(out.rglob("*"), reverse=True):  # a 1B bundle is ~1.5 GB of disk
                f.unlink() if f.is_file() else f.rmdir()
            out.rmdir()
        if not args.skip_torch and manifest is not None:
            torch_args = {"model": model or "smollm2-135m",
                          "lora": {k: manifest.method["config"][k] for k in ("rank", "alpha", "targets", "use_rslora")},
                          "adamw": {k: manifest.optimizer[k] for k in ("betas", "eps", "weight_decay")}}

            def run_torch():
                wait_for_memory(NEED_PER_FP32_BYTE["torch"] * fp32_bytes, f"{name} PyTorch+PEFT", say)
                say(f"{name}: PyTorch+PEFT training steps (fp32)")
                return trainer_cell(worker("torch", {**common, **torch_args}), tokens)

            row["pytorch_peft"] = attempt(run_torch, f"{name} PyTorch+PEFT", say)
        rows.append(row)
    return rows


def _gb(x) -> str:
    return f"{x / GB:.2f} GB" if x else "—"


def render_growth(rows: list[dict], quantizations: list[str]) -> str:
    head = (f"{'model':<14}{'params':>8}" + "".join(f"{'edgetune ' + q + ' peak':>22}{'ratio':>7}" for q in quantizations)
            + f"{'PyTorch peak':>14}" + "".join(f"{'et ' + q + ' step':>14}" for q in quantizations)
            + f"{'PyTorch step':>14}" + "".join(f"{'export ' + q + ' peak':>20}" for q in quantizations))
    lines = [head]
    for r in rows:
        t = r.get("pytorch_peft") or {}
        line = f"{r['model']:<14}{r['parameters'] / 1e6:>7.0f}M"
        for q in quantizations:
            e = r["edgetune"].get(q) or {}
            ratio = (f"{e['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}x"
                     if e.get("peak_rss_bytes") and t.get("peak_rss_bytes") else "—")
            line += f"{_gb(e.get('peak_rss_bytes')) if 'error' not in e else 'failed':>22}{ratio:>7}"
        line += f"{_gb(t.get('peak_rss_bytes')) if 'error' not in t else 'failed':>14}"
        for q in quantizations:
            e = r["edgetune"].get(q) or {}
            line += f"{e['step_s']:>13.2f}s" if "step_s" in e else f"{'—':>14}"
        line += f"{t['step_s']:>13.2f}s" if "step_s" in t else f"{'—':>14}"
        for q in quantizations:
            x = r["exports"].get(q) or {}
            line += f"{_gb(x.get('peak_rss_bytes')) if 'error' not in x else 'failed':>20}"
        lines.append(line)
    return "\n".join(lines)
