"""``make bench``: edgetune's on-device training step against PyTorch+PEFT, in one run.

Same machine, threads, model (default: the built-in smollm2-135m), LoRA (from the bundle: r=8,
alpha=16 on q_proj,v_proj unless --bundle says otherwise), AdamW, batch and sequence length.
Each trainer runs in its own process (bench/workers.py); its peak RSS is the kernel's count for
that process. Prints a table and writes bench/results/latest.json. See bench/README.md.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `bench` and the repo's `edgetune`

from bench import compute_int8, machine, sizes, table  # noqa: E402
from bench.data import label_positions, make_batch  # noqa: E402
from bench.flops import FORMULA, decoder_linear_weights, useful_flops  # noqa: E402
from bench.spawn import ChildFailed, run_child, worker  # noqa: E402
from bench.table import NAMES  # noqa: E402
from bench.workers import LEARNING_RATE  # noqa: E402

GEMM_N, GEMM_RUNS = 2048, 10
INT8_GEMMS = ("int8", "int8-dynamic")  # bench/workers.py GEMM_KINDS: MatMulInteger, DynamicQuantizeMatMul
DEFAULT_DATA = HERE.parent / "edgetune" / "data" / "records-train.jsonl"
OTHERS_LIMIT = 0.15  # cores other processes may take during a timed run before the bench warns
LORA = {"rank": 8, "alpha": 16, "targets": "q_proj,v_proj"}  # what a fresh export uses


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="edgetune's training step (ort-training backend) against PyTorch+PEFT on the same machine, "
                    "model, LoRA, AdamW, batch and threads: step time, tokens/s, peak RSS, share of the GEMM rate, "
                    "export time, bundle and delta size. See bench/README.md.")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for ONNX Runtime and torch")
    p.add_argument("--batch-size", type=int, default=4, help="rows per training step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--model", default=None,
                   help="model to export and to load in PyTorch: HF folder, .gguf file or built-in name "
                        "(unset: the built-in smollm2-135m, or the --bundle's base)")
    p.add_argument("--bundle", type=Path, default=None, help="reuse this exported bundle instead of exporting one")
    p.add_argument("--quantize", default="int8", choices=["int8", "none"], help="frozen base weights of the export (with --bundle, the bundle's own are used)")
    p.add_argument("--recompute", default="cheap", choices=["full", "cheap", "mlp", "none"],
                   help="the export's activation recompute policy (with --bundle, the bundle's own is used)")
    p.add_argument("--prompt-fraction", type=float, default=0.0,
                   help="share of each row labelled -100 (a prompt without loss), e.g. 0.5")
    p.add_argument("--skip-torch", action="store_true", help="measure edgetune only")
    p.add_argument("--skip-portable", action="store_true", help="measure the ort-training backend only")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="real instruction data (JSONL) for the second comparison: edgetune packed vs PyTorch+PEFT padded")
    p.add_argument("--data-examples", type=int, default=16, help="examples per step on the real data (both trainers)")
    p.add_argument("--max-seq-len", type=int, default=256, help="edgetune's packed row length on the real data")
    p.add_argument("--skip-data", action="store_true", help="skip the real-data comparison")
    p.add_argument("--grid", action="store_true",
                   help="instead of the comparison: step time and peak RSS of both trainers for every batch x "
                        "sequence length of --grid-batches x --grid-seqs (writes bench/results/grid.json)")
    p.add_argument("--grid-batches", default="1,4,8", help="batch sizes of the --grid")
    p.add_argument("--grid-seqs", default="128,256,512", help="sequence lengths of the --grid")
    compute_int8.add_arguments(p)
    p.add_argument("--sizes", default=None,
                   help="instead of the comparison: peak RSS and step time per model size, e.g. 135m,360m,1b "
                        "(Llama-shaped, published configs, random weights; bench/growth.py), with an int8 and an int4 "
                        "base for edgetune, at --batch-size x --seq-len (writes bench/results/growth.json)")
    p.add_argument("--size-quantize", default="int8,int4", help="edgetune bases exported per --sizes model")
    p.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgetune-growth-models",
                   help="where --sizes builds (and reuses) the random-weight model folders")
    p.add_argument("--json-out", type=Path, default=HERE / "results" / "latest.json", help="where to write the JSON")
    args = p.parse_args(argv)
    problems = [f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}."
                for name, low in (("threads", 1), ("batch_size", 1), ("seq_len", 2), ("steps", 1), ("warmup", 1),
                                  ("data_examples", 1), ("max_seq_len", 8))
                if getattr(args, name) < low]
    if not 0.0 <= args.prompt_fraction or label_positions(make_batch(2, 1, args.seq_len, args.prompt_fraction)["labels"]) == 0:
        problems.append(f"--prompt-fraction must leave labels in a row of {args.seq_len} tokens, got {args.prompt_fraction}.")
    if args.bundle is not None and not (args.bundle / "edgetune.json").is_file():
        problems.append(f"--bundle {args.bundle} has no edgetune.json; give a folder written by `edgetune export`.")
    if args.sizes and (bad := [q for q in args.size_quantize.split(",") if q not in ("int8", "int4", "none")]):
        problems.append(f"--size-quantize takes int8, int4 or none (comma-separated), got {', '.join(bad)}.")
    if args.grid and args.json_out == HERE / "results" / "latest.json":
        args.json_out = HERE / "results" / "grid.json"
    if args.sizes and args.json_out == HERE / "results" / "latest.json":
        args.json_out = HERE / "results" / "growth.json"
    if not args.skip_data and not args.grid and not args.sizes and not args.data.is_file():
        problems.append(f"--data {args.data} is not a file; give a JSONL file of instruction records, or --skip-data.")
    problems += compute_int8.problems(args)
    if problems:
        p.error(" ".join(problems))
    return args


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def export(args, tmp: Path, extra: tuple = ()) -> tuple[Path, dict]:
    if args.bundle is not None:
        return args.bundle, {"seconds": None, "peak_rss_bytes": None, "command": None}
    out = tmp / "bundle"
    argv = [sys.executable, "-m", "edgetune.cli", "export", *([args.model] if args.model else []), "--out", str(out),
            "--quantize", args.quantize, "--rank", str(LORA["rank"]), "--alpha", str(LORA["alpha"]),
            "--targets", LORA["targets"], "--recompute", args.recompute, "--force", *extra]
    say(f"exporting {args.model or 'the default model'} (--quantize {args.quantize} --recompute {args.recompute}); "
        "about a minute")
    run = run_child(argv, parse_result=False)
    return out, {"seconds": run["wall_s"], "peak_rss_bytes": run["ru_maxrss_bytes"],
                 "command": "edgetune " + " ".join(argv[3:])}


def torch_model(args, manifest) -> str | None:
    """The model PyTorch loads: the bundle's own base (checked by its SHA-256)."""
    from edgetune.export.sources import BUILTIN_MODELS, resolve_source

    name = args.model or (manifest.base_model["id"] if manifest.base_model["id"] in BUILTIN_MODELS else None)
    if name is None:
        sys.exit(f"bench: the bundle's base model {manifest.base_model['id']!r} is not built in; "
                 "give its folder or .gguf file with --model.")
    if resolve_source(name).sha256() != manifest.base_sha256:
        sys.exit(f"bench: --model {name} is not the base model the bundle was exported from "
                 f"({manifest.base_model['id']}); give the same model, or --skip-torch.")
    return name


def trainer_summary(r: dict, tokens: int, flop: float, gemm_rate: float) -> dict:
    step = statistics.median(r["times"])
    before = r["rss_before_steps_bytes"]
    hw = r.get("steps_high_water_bytes")
    return {
        "step_s": step, "step_min_s": min(r["times"]), "step_max_s": max(r["times"]), "step_times_s": r["times"],
        "tokens_per_s": tokens / step, "useful_gflop_per_s": flop / step / 1e9, "fraction_of_gemm": flop / step / gemm_rate,
        "first_loss": r["losses"][0], "losses": r["losses"],
        "peak_rss_bytes": r["peak_rss_bytes"],
        "rss_before_steps_bytes": before,
        "rss_growth_after_warmup_bytes": r["rss_after_warmup_bytes"] - before,
        "steps_peak_growth_bytes": None if hw is None else hw - before,
        "cores_busy": r["cores_busy"], "other_cores": r["other_cores"], "process_wall_s": r["wall_s"],
        **{k: r[k] for k in ("torch_imported", "trainable_parameters") if k in r},
    }


def ratios(e: dict, t: dict) -> dict:
    def div(key):
        return None if e.get(key) is None or not t.get(key) else e[key] / t[key]

    return {"speedup_tokens_per_s": div("tokens_per_s"), "peak_rss_ratio": div("peak_rss_bytes"),
            "rss_growth_after_warmup_ratio": div("rss_growth_after_warmup_bytes"),
            "steps_peak_growth_ratio": div("steps_peak_growth_bytes")}


def portable_ratios(trainers: dict) -> dict | None:
    """portable / ort-training on step time and peak RSS (the goal: each at most 1.25)."""
    p, o = trainers.get("edgetune_portable"), trainers.get("edgetune")
    if p is None or o is None:
        return None
    return {"step_time_ratio": p["step_s"] / o["step_s"], "peak_rss_ratio": p["peak_rss_bytes"] / o["peak_rss_bytes"],
            "steps_peak_growth_ratio": (None if not o.get("steps_peak_growth_bytes") or p.get("steps_peak_growth_bytes") is None
                                        else p["steps_peak_growth_bytes"] / o["steps_peak_growth_bytes"])}


def warnings(r: dict) -> list[str]:
    """Signs that other processes shared the CPU while something was timed: then the timings say little."""
    windows = {"GEMM": r["gemm"], **{NAMES.get(n, n): t for n, t in r["trainers"].items()},
               **{f"{g['op']} GEMM": g for g in r.get("gemm_int8", {}).values()},
               **{f"{NAMES.get(n, n)} on real data": t for n, t in ((r.get("real_data") or {}).get("trainers") or {}).items()}}
    busy = {n: w["other_cores"] for n, w in windows.items() if (w.get("other_cores") or 0) > OTHERS_LIMIT}
    if not busy:
        return []
    return ["other processes used the CPU during the timed runs ("
            + ", ".join(f"{n}: {c:.2f} cores" for n, c in busy.items()) + ")."]


def measure(args, tmp: Path) -> dict:
    """Export (or reuse) the bundle and run every worker; raw results, sizes and the manifest."""
    from edgetune.bundle import read_manifest

    bundle, export_info = export(args, tmp)
    manifest = read_manifest(bundle, verify=False)
    model = None if args.skip_torch else torch_model(args, manifest)
    common = {"batch": args.batch_size, "seq": args.seq_len, "threads": args.threads, "steps": args.steps,
              "warmup": args.warmup, "prompt_fraction": args.prompt_fraction}
    gemm_args = {"threads": args.threads, "n": GEMM_N, "runs": GEMM_RUNS}
    say(f"GEMM rates ({GEMM_N}^3 fp32, and int8: {', '.join(INT8_GEMMS)}; {args.threads} threads)")
    gemms = [worker("gemm", gemm_args)]
    int8 = {kind: [worker("gemm", {**gemm_args, "kind": kind})] for kind in INT8_GEMMS}
    say("edgetune training steps (ort-training backend)")
    runs = {"edgetune": worker("edgetune", {**common, "bundle": str(bundle)})}
    if not args.skip_portable and (manifest.portable or {}).get("supported"):
        say("edgetune training steps (portable backend: stock InferenceSession + numpy AdamW)")
        runs["edgetune_portable"] = worker("edgetune", {**common, "bundle": str(bundle), "backend": "portable"})
    if not args.skip_torch:
        say("PyTorch+PEFT training steps")
        lora = {k: manifest.method["config"][k] for k in ("rank", "alpha", "targets", "use_rslora")}
        adamw = {k: manifest.optimizer[k] for k in ("betas", "eps", "weight_decay")}
        runs["pytorch_peft"] = worker("torch", {**common, "model": model, "lora": lora, "adamw": adamw})
    real = {}
    if not args.skip_data:
        steps = {"data": str(args.data), "examples": args.data_examples, "max_seq_len": args.max_seq_len,
                 "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "bundle": str(bundle)}
        say(f"real data ({args.data.name}, {args.data_examples} examples a step): edgetune packed")
        real["edgetune"] = worker("edgetune", steps)
        if not args.skip_torch:
            say("real data: PyTorch+PEFT padded to the longest example of each step")
            real["pytorch_peft"] = worker("torch", {**steps, "model": model, "lora": lora, "adamw": adamw})
    real_args = None if args.skip_data else steps
    int8_export = compute_int8.measure(args, tmp, export, worker, say, common, real_args, runs, real)
    say("GEMM rates again (the faster of the two runs is the yardstick)")
    gemms.append(worker("gemm", gemm_args))
    for kind in INT8_GEMMS:
        int8[kind].append(worker("gemm", {**gemm_args, "kind": kind}))
    if int8_export is not None:
        export_info = {**export_info, "compute_int8": int8_export}
    return {"manifest": manifest, "export": export_info, "gemms": gemms, "int8_gemms": int8, "runs": runs, "real": real,
            "bundle": sizes.bundle_bytes(bundle), "delta": sizes.delta_bytes(manifest)}


def summarize(args, argv, m: dict) -> dict:
    manifest = m["manifest"]
    config = manifest.base_model["config"]
    labels = label_positions(make_batch(config["vocab_size"], args.batch_size, args.seq_len, args.prompt_fraction)["labels"])
    n_mats, linear = decoder_linear_weights(manifest.frozen)
    flop = useful_flops(config, linear, args.batch_size, args.seq_len, labels)
    gemm_rates = [g["flop"] / statistics.median(g["times"]) for g in m["gemms"]]
    gemm = m["gemms"][gemm_rates.index(max(gemm_rates))]
    tokens = args.batch_size * args.seq_len
    trainers = {name: trainer_summary(r, tokens, flop["total"], max(gemm_rates)) for name, r in m["runs"].items()}
    mc = manifest.method["config"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "bench/run.py", *argv]),
        "config": {"model": manifest.base_model["id"], "base_sha256": manifest.base_sha256,
                   "method": f"LoRA r={mc['rank']} alpha={mc['alpha']:g} on {','.join(mc['targets'])}",
                   "quantize": manifest.quantization, "memory_plan": manifest.producer.get("memory"),
                   "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "prompt_fraction": args.prompt_fraction, "steps": args.steps, "warmup": args.warmup,
                   "learning_rate": LEARNING_RATE, "optimizer": manifest.optimizer},
        "gemm": {"n": GEMM_N, "runs": GEMM_RUNS, "gflop_per_s": max(gemm_rates) / 1e9,
                 "gflop_per_s_before_after": [x / 1e9 for x in gemm_rates], "times_s": gemm["times"],
                 "cores_busy": gemm["cores_busy"], "other_cores": gemm["other_cores"]},
        "flops": {**flop, "label_positions": labels, "decoder_linear_matrices": n_mats,
                  "decoder_linear_weights": linear, "formula": FORMULA},
        "export": m["export"], "bundle": m["bundle"], "delta": m["delta"],
        "base_model_bytes_fp32": 4 * manifest.base_model["parameters"],
        "trainers": trainers,
        "ratios": ratios(trainers["edgetune"], trainers["pytorch_peft"]) if "pytorch_peft" in trainers else None,
        "portable_vs_ort_training": portable_ratios(trainers),
        "gemm_int8": {kind: gemm_summary(runs) for kind, runs in m["int8_gemms"].items()},
        "real_data": real_summary(args, m["real"]) if m["real"] else None,
    }
    return result


def gemm_summary(runs: list[dict]) -> dict:
    """The faster of the before/after runs of one GEMM kind (GOP/s: int8 operations count like FLOPs)."""
    rates = [g["flop"] / statistics.median(g["times"]) for g in runs]
    best = runs[rates.index(max(rates))]
    return {"op": best["op"], "gop_per_s": max(rates) / 1e9, "gop_per_s_before_after": [x / 1e9 for x in rates],
            "times_s": best["times"], "other_cores": max((g["other_cores"] or 0) for g in runs)}


def real_summary(args, runs: dict) -> dict:
    """Useful (non-padding) tokens per second over the timed steps, and how much of each batch was padding."""
    trainers = {}
    for name, r in runs.items():
        timed = slice(args.warmup, args.warmup + args.steps)
        real, rows = sum(r["real_tokens"][timed]), sum(r["row_tokens"][timed])
        trainers[name] = {
            "useful_tokens_per_s": real / sum(r["times"]), "step_s": statistics.median(r["times"]),
            "step_times_s": r["times"], "efficiency": real / rows, "useful_tokens": real, "row_tokens": rows,
            "shapes": r["shapes"][timed], "first_loss": r["losses"][0], "losses": r["losses"],
            "peak_rss_bytes": r["peak_rss_bytes"], "other_cores": r["other_cores"], "cores_busy": r["cores_busy"],
        }
    e, t = trainers.get("edgetune"), trainers.get("pytorch_peft")
    return {"data": str(args.data.name), "examples_per_step": args.data_examples, "max_seq_len": args.max_seq_len,
            "steps": args.steps, "warmup": args.warmup, "trainers": trainers,
            "speedup_useful_tokens_per_s": e["useful_tokens_per_s"] / t["useful_tokens_per_s"] if e and t else None,
            "peak_rss_ratio": e["peak_rss_bytes"] / t["peak_rss_bytes"] if e and t else None}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--methods" in argv:  # every adaptation method instead: bench/methods.py takes the other options
        from bench.methods import main as methods_main

        return methods_main([a for a in argv if a != "--methods"])
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine.machine(args.threads)  # before our own load
    from edgetune.errors import EdgetuneError

    with tempfile.TemporaryDirectory(prefix="edgetune-bench-") as tmp:
        try:
            if args.grid:
                return grid_main(args, argv, info, Path(tmp), started)
            if args.sizes:
                return growth_main(args, argv, info, Path(tmp), started)
            measured = measure(args, Path(tmp))
        except (ChildFailed, EdgetuneError) as exc:
            sys.exit(f"bench: {exc}")
    result = {**summarize(args, argv, measured), "machine": info, "versions": machine.versions(),
              "bench_wall_s": time.perf_counter() - started}
    result["warnings"] = warnings(result)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(table.render(result))
    print(f"\nwrote {args.json_out} ({result['bench_wall_s']:.0f} s)")


def grid_main(args, argv, info: dict, tmp: Path, started: float) -> None:
    from bench.grid import render_grid, run_grid
    from edgetune.bundle import read_manifest

    bundle, export_info = export(args, tmp)
    manifest = read_manifest(bundle, verify=False)
    torch_args = None
    if not args.skip_torch:
        torch_args = {"model": torch_model(args, manifest),
                      "lora": {k: manifest.method["config"][k] for k in ("rank", "alpha", "targets", "use_rslora")},
                      "adamw": {k: manifest.optimizer[k] for k in ("betas", "eps", "weight_decay")}}
    cells = run_grid(args, bundle, torch_args, say)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, "bench/run.py", *argv]),
              "config": {"model": manifest.base_model["id"], "quantize": manifest.quantization,
                         "memory_plan": manifest.producer.get("memory"), "steps": args.steps, "warmup": args.warmup,
                         "prompt_fraction": args.prompt_fraction},
              "export": export_info, "grid": cells, "machine": info, "versions": machine.versions(),
              "bench_wall_s": time.perf_counter() - started}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{manifest.base_model['id']}, edgetune base {manifest.quantization}; {info['cpu']}, "
          f"SIMD: {', '.join(info['simd']) or 'not recorded'}; {args.threads} threads; median of {args.steps} steps "
          f"after {args.warmup} warm-up; peak RSS = whole process (OS)")
    print(render_grid(cells))
    busy = [f"{c['batch']}x{c['seq']} {NAMES[n]}" for c in cells for n, t in c["trainers"].items()
            if (t.get("other_cores") or 0) > OTHERS_LIMIT]
    if busy:
        print(f"WARNING: other processes used the CPU during {len(busy)} of the timed runs; timings are not comparable.")
    print(f"\nwrote {args.json_out} ({result['bench_wall_s']:.0f} s)")


def growth_main(args, argv, info: dict, tmp: Path, started: float) -> None:
    from bench.growth import render_growth, run_growth

    rows = run_growth(args, tmp, LORA, say)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, "bench/run.py", *argv]),
              "config": {"batch": args.batch_size, "seq": args.seq_len, "threads": args.threads, "steps": args.steps,
                         "warmup": args.warmup, "lora": LORA, "int4_block_size": 64, "recompute": args.recompute, "pytorch_dtype": "float32"},
              "sizes": rows, "machine": info, "versions": machine.versions(), "bench_wall_s": time.perf_counter() - started}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"LoRA r={LORA['rank']} on {LORA['targets']}, batch {args.batch_size} x {args.seq_len}, {args.threads} threads; "
          f"{info['cpu']}; peak RSS = whole process (OS); ratio = edgetune / PyTorch+PEFT (fp32)")
    print(render_growth(rows, args.size_quantize.split(",")))
    busy = [r["model"] for r in rows for t in [*r["edgetune"].values(), r.get("pytorch_peft") or {}]
            if (t.get("other_cores") or 0) > OTHERS_LIMIT]
    if busy:
        print(f"WARNING: other processes used the CPU during {len(busy)} timed runs; step times are not comparable.")
    print(f"\nwrote {args.json_out} ({result['bench_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
