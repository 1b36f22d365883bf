"""``make bench-methods``: every adaptation method on one model, one table.

For each method (``METHODS``): export the model with that method's options (or reuse
``--bundles DIR/NAME``), then, each in its own process, time edgetune's training step on both
backends (ort-training, portable) and a PyTorch reference of the same method (PEFT LoRA, PEFT
prefix tuning, AdapterHub's bottleneck adapter, plain fp32 full fine-tuning). Reports the
median step time and the peak RSS of each process (bench/spawn.py, bench/memory.py), the
trainable parameter count, the bundle size and the delta file size per codec (bench/sizes.py).
Writes bench/results/methods.json and prints a table headed by the CPU and its SIMD features.

    python bench/methods.py [--bundles DIR] [--only lora,full] [--threads 2] [--steps 5]
    python bench/run.py --methods ...          # the same
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `bench` and the repo's `edgetune`

from bench import machine, sizes  # noqa: E402
from bench.spawn import ChildFailed, run_child, worker  # noqa: E402
from bench.workers import LEARNING_RATE  # noqa: E402

# name -> (edgetune export options, the PyTorch reference in bench/method_workers.py)
METHODS = {
    "lora": ([], "peft-lora"),  # the default export: LoRA r=8 on q_proj,v_proj, int8 base
    "lora-all-linear": (["--targets", "all-linear", "--rank-pattern", "down_proj=16"], "peft-lora"),
    "adapter": (["--method", "adapter", "--adapter-dim", "16", "--adapter-where", "mlp,attn"], "adapters"),
    "prefix": (["--method", "prefix", "--num-virtual-tokens", "16"], "peft-prefix"),
    "full": (["--method", "full", "--quantize", "none"], "full"),
    "lora-int4": (["--quantize", "int4", "--block-size", "64"], "peft-lora"),
}
MB, GB = 1e6, 1e9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/methods.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Per adaptation method: edgetune's training step on both backends and a PyTorch reference "
                    "(step time, peak RSS), trainable parameters, bundle and delta size. See bench/README.md.")
    p.add_argument("--only", default=",".join(METHODS), help=f"comma-separated methods of: {', '.join(METHODS)}")
    p.add_argument("--bundles", type=Path, default=None,
                   help="reuse DIR/NAME as method NAME's bundle; a missing one is exported there and kept "
                        "(unset: export into a temporary folder)")
    p.add_argument("--model", default=None, help="model to export and to load in PyTorch (unset: the built-in smollm2-135m)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for ONNX Runtime and torch")
    p.add_argument("--batch-size", type=int, default=4, help="rows per training step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--skip-torch", action="store_true", help="no PyTorch references")
    p.add_argument("--skip-portable", action="store_true", help="no portable backend")
    p.add_argument("--json-out", type=Path, default=HERE / "results" / "methods.json", help="where to write the JSON")
    args = p.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    problems = [f"--only: unknown method {m!r} (known: {', '.join(METHODS)})." for m in args.only if m not in METHODS]
    problems += [f"--{n.replace('_', '-')} must be at least {low}, got {getattr(args, n)}."
                 for n, low in (("threads", 1), ("batch_size", 1), ("seq_len", 2), ("steps", 1), ("warmup", 1))
                 if getattr(args, n) < low]
    if not args.only:
        problems.append("--only names no method.")
    if problems:
        p.error(" ".join(problems))
    return args


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def bundle_for(args, name: str, tmp: Path) -> tuple[Path, dict | None]:
    """The method's bundle (reused from --bundles, else exported): (folder, export facts or None)."""
    folder = (args.bundles or tmp) / name
    if (folder / "edgetune.json").is_file():
        return folder, None
    options = METHODS[name][0]
    argv = [sys.executable, "-m", "edgetune.cli", "export", *([args.model] if args.model else []), *options,
            "--out", str(folder), "--force"]
    say(f"{name}: exporting ({' '.join(options) or 'default options'}); about a minute on the default model")
    run = run_child(argv, parse_result=False)
    return folder, {"seconds": run["wall_s"], "peak_rss_bytes": run["ru_maxrss_bytes"],
                    "command": "edgetune " + " ".join(argv[3:])}


def reference_args(args, manifest, reference: str, common: dict) -> dict:
    from bench.run import torch_model

    return {**common, "reference": reference, "model": torch_model(SimpleNamespace(model=args.model), manifest),
            "config": manifest.method["config"], "peft_config": manifest.method.get("peft_config"),
            "adamw": {k: manifest.optimizer[k] for k in ("betas", "eps", "weight_decay")}}


def method_worker(a: dict) -> dict:
    """bench/method_workers.py in a child process; peak RSS as bench/spawn.py's ``worker`` counts it."""
    run = run_child([sys.executable, str(HERE / "method_workers.py"), json.dumps(a)], parse_result=True)
    result = run["result"]
    result["peak_rss_bytes"] = max(run["ru_maxrss_bytes"], result.get("load_high_water_bytes") or 0)
    result["wall_s"] = run["wall_s"]
    return result


def trainer(r: dict) -> dict:
    before = r["rss_before_steps_bytes"]
    hw = r.get("steps_high_water_bytes")
    return {"step_s": statistics.median(r["times"]), "step_times_s": r["times"], "losses": r["losses"],
            "peak_rss_bytes": r["peak_rss_bytes"], "rss_before_steps_bytes": before,
            "steps_peak_growth_bytes": None if hw is None else hw - before,
            "cores_busy": r["cores_busy"], "other_cores": r["other_cores"], "process_wall_s": r["wall_s"],
            **{k: r[k] for k in ("trainable_parameters", "torch_imported") if k in r}}


def measure_method(args, name: str, tmp: Path, references: dict) -> dict:
    """One method's row. ``references`` caches PyTorch runs by their arguments (LoRA int8 and int4 share one)."""
    from edgetune.bundle import read_manifest

    bundle, export_info = bundle_for(args, name, tmp)
    manifest = read_manifest(bundle, verify=False)
    expected = "lora" if "--method" not in METHODS[name][0] else METHODS[name][0][1]
    if manifest.method["name"] != expected:
        raise ChildFailed(f"{bundle} holds a {manifest.method['name']} bundle, not {expected}; "
                          f"give method {name}'s bundle or remove it so it is exported.")
    common = {"batch": args.batch_size, "seq": args.seq_len, "threads": args.threads, "steps": args.steps,
              "warmup": args.warmup, "prompt_fraction": 0.0}
    trainers = {}
    say(f"{name}: edgetune training steps (ort-training backend)")
    trainers["edgetune"] = trainer(worker("edgetune", {**common, "bundle": str(bundle)}))
    if not args.skip_portable and (manifest.portable or {}).get("supported"):
        say(f"{name}: edgetune training steps (portable backend)")
        trainers["edgetune_portable"] = trainer(worker("edgetune", {**common, "bundle": str(bundle), "backend": "portable"}))
    if not args.skip_torch:
        ref = reference_args(args, manifest, METHODS[name][1], common)
        key = json.dumps(ref, sort_keys=True)
        if key not in references:
            say(f"{name}: PyTorch reference ({ref['reference']}) training steps")
            references[key] = trainer(method_worker(ref))
        trainers["pytorch"] = {**references[key], "reference": ref["reference"]}
    delta = sizes.delta_bytes(manifest)
    base_fp32 = 4 * manifest.base_model["parameters"]
    return {
        "export_options": METHODS[name][0], "bundle_folder": str(bundle), "export": export_info,
        "method": manifest.method["name"], "method_config": manifest.method["config"],
        "quantize": manifest.quantization, "memory_plan": manifest.producer.get("memory"),
        "trainable_parameters": delta["values"], "base_parameters": manifest.base_model["parameters"],
        "bundle_bytes": sizes.bundle_bytes(bundle), "delta_file_bytes": delta["file"],
        "delta_payload_bytes": delta["payload"], "base_model_bytes_fp32": base_fp32,
        "trainers": trainers, "ratios": ratios(trainers),
    }


def ratios(t: dict) -> dict:
    def div(a, b, key):
        return None if a not in t or b not in t or not t[b].get(key) else t[a][key] / t[b][key]

    return {"edgetune_vs_pytorch_step": div("edgetune", "pytorch", "step_s"),
            "edgetune_vs_pytorch_peak_rss": div("edgetune", "pytorch", "peak_rss_bytes"),
            "portable_vs_ort_training_step": div("edgetune_portable", "edgetune", "step_s"),
            "portable_vs_ort_training_peak_rss": div("edgetune_portable", "edgetune", "peak_rss_bytes")}


def _s(t: dict | None) -> str:
    return "—" if t is None else f"{t['step_s']:.2f} s"


def _rss(t: dict | None) -> str:
    return "—" if t is None else f"{t['peak_rss_bytes'] / GB:.2f} GB"


def _x(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def render(result: dict) -> str:
    m, c = result["machine"], result["config"]
    lines = [f"{c['model']}; batch {c['batch_size']} x {c['seq_len']}, {c['threads']} threads, median of {c['steps']} "
             f"steps after {c['warmup']} warm-up, AdamW lr {LEARNING_RATE:g}; {m['cpu']}, SIMD: "
             f"{', '.join(m['simd']) or 'not recorded'}; peak RSS = whole process (OS)",
             "| method | export options | base | trainable | bundle | delta fp16 / int8 | ort-training step / peak RSS "
             "| portable step / peak RSS | PyTorch reference step / peak RSS | edgetune/PyTorch step, RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["methods"].items():
        t, r = row["trainers"], row["ratios"]
        ref = t.get("pytorch")
        share = 100 * row["trainable_parameters"] / row["base_parameters"]
        delta = " / ".join(f"{row['delta_file_bytes'][k] / MB:.2f} MB" if row["delta_file_bytes"].get(k) else "—"
                           for k in ("fp16", "int8"))
        lines.append(
            f"| {name} | `{' '.join(row['export_options']) or '(default)'}` | {row['quantize']} "
            f"| {row['trainable_parameters']:,} ({share:.2f} %) | {row['bundle_bytes']['total'] / MB:.1f} MB | {delta} "
            f"| {_s(t.get('edgetune'))} / {_rss(t.get('edgetune'))} "
            f"| {_s(t.get('edgetune_portable'))} / {_rss(t.get('edgetune_portable'))} "
            f"| {_s(ref)} / {_rss(ref)}{'' if ref is None else ' (' + ref['reference'] + ')'} "
            f"| {_x(r['edgetune_vs_pytorch_step'])}, {_x(r['edgetune_vs_pytorch_peak_rss'])} |")
    for name, error in result.get("failed", {}).items():
        lines.append(f"FAILED {name}: {error.splitlines()[0]}")
    if result["warnings"]:
        lines.append("WARNING: " + " ".join(result["warnings"]) + " The step times say little; sizes and RSS stand.")
    return "\n".join(lines)


def warnings(result: dict, limit: float = 0.15) -> list[str]:
    busy = [f"{name} {who}: {t['other_cores']:.2f} cores" for name, row in result["methods"].items()
            for who, t in row["trainers"].items() if (t.get("other_cores") or 0) > limit]
    return [f"other processes used the CPU during timed runs ({', '.join(busy)})."] if busy else []


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine.machine(args.threads)  # before our own load
    from edgetune.errors import EdgetuneError

    rows, references, failed = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-methods-") as tmp:
        for name in args.only:  # one method's failure is reported; the others are still measured
            try:
                rows[name] = measure_method(args, name, Path(tmp), references)
            except (ChildFailed, EdgetuneError) as exc:
                say(f"{name} failed: {exc}")
                failed[name] = str(exc)
    if not rows:
        sys.exit("bench: every method failed (above).")
    first = next(iter(rows.values()))
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "bench/methods.py", *argv]),
        "config": {"model": args.model or "smollm2-135m", "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                   "learning_rate": LEARNING_RATE, "base_parameters": first["base_parameters"]},
        "methods": rows, "failed": failed, "machine": info, "versions": machine.versions(),
        "bench_wall_s": time.perf_counter() - started,
    }
    result["warnings"] = warnings(result)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"\nwrote {args.json_out} ({result['bench_wall_s']:.0f} s)")
    if failed:
        sys.exit(f"bench: failed: {', '.join(failed)} (see above and the JSON's `failed`).")


if __name__ == "__main__":
    main()
