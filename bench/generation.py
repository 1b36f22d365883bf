"""``make bench-generate``: edgetune's generation against transformers on the same model, prompt and threads.

    python bench/generation.py [--bundle PATH] [--threads 2] [--new-tokens 64] [--computes exact,int8]

Each run is its own process (bench/spawn.py), started cold; its peak RSS is the kernel's count for
that process (wait4's ru_maxrss). Both decode greedily the same prompt ids (the bundle's chat
template around --prompt), exactly --new-tokens tokens (no stop token), with a key/value cache:

* edgetune: ``Bundle.open`` (hashes the files `edgetune generate` reads) + ``Generator`` (session from the bundle's
  ``generation-cache``) with the adapter off (the base model, as transformers runs it). Run twice
  per compute: "cold" after deleting the cache (the first start on a device builds it) and "warm".
* transformers: ``AutoModelForCausalLM.from_pretrained`` of the bundle's base model (fp32, as
  published), ``use_cache=True``, ``torch.set_num_threads(--threads)``.

Reported per run: time from process spawn to the first generated token (load + prompt), load time,
tokens/s of the decode steps after the first token, CPU seconds (user + system, which other jobs on
the machine do not inflate the way they inflate wall time), peak RSS, and the first 16 token ids
(the exact run's must equal transformers' up to the int8 rounding of the base). The machine's CPU
and SIMD features are printed above the table and stored in the JSON (bench/results/generation.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `bench` and the repo's `edgetune`

from bench import machine  # noqa: E402
from bench.spawn import RESULT_PREFIX, run_child  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."
CACHE_DIR = "generation-cache"  # edgetune.runtime.generation_session.CACHE_DIR


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/generation.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle to generate with (unset: export the default model)")
    p.add_argument("--model", default=None, help="model transformers loads (unset: the bundle's built-in base)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for ONNX Runtime and torch")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated greedily per run")
    p.add_argument("--prompt", default=PROMPT, help="user message (rendered with the bundle's chat template)")
    p.add_argument("--computes", default="exact,int8", help="edgetune generate --compute values to run")
    p.add_argument("--skip-transformers", action="store_true", help="measure edgetune only")
    p.add_argument("--json-out", type=Path, default=HERE / "results" / "generation.json")
    args = p.parse_args(argv)
    problems = [f"--{n.replace('_', '-')} must be at least {low}, got {getattr(args, n)}."
                for n, low in (("threads", 1), ("new_tokens", 2)) if getattr(args, n) < low]
    bad = [c for c in args.computes.split(",") if c not in ("exact", "int8")]
    if bad:
        problems.append(f"--computes takes exact and/or int8, got {', '.join(bad)}.")
    if args.bundle is not None and not (args.bundle / "edgetune.json").is_file():
        problems.append(f"--bundle {args.bundle} has no edgetune.json; give a folder written by `edgetune export`.")
    if problems:
        p.error(" ".join(problems))
    return args


# --- children -------------------------------------------------------------------------------------
def child_edgetune(a: dict) -> dict:
    import numpy as np

    from edgetune.bundle import GENERATE_ROLES, Bundle
    from edgetune.runtime.adapter_source import disabled, initial_adapter
    from edgetune.runtime.generate import Generator

    bundle = Bundle.open(a["bundle"], verify=GENERATE_ROLES)  # as `edgetune generate`: only the files it reads
    generator = Generator(bundle, threads=a["threads"], compute=a["compute"])
    off = disabled(bundle, initial_adapter(bundle))
    feeds = generator._adapter_feeds(off)  # checked once, as Generator.generate does
    loaded = time.time()
    return {"loaded_at": loaded, **_decode(lambda ids, past: _edgetune_step(generator, ids, past, off, feeds), a, np)}


def _edgetune_step(generator, ids, past, adapter, feeds):
    """One step of Generator.generate's loop (its body, so the first token can be timed)."""
    import numpy as np

    if past is None:
        past = generator._initial_past(1, adapter)
    start = past[0].shape[2]
    end = start + ids.shape[1]
    logits, past = generator._step(ids, np.ones((1, end), np.int64), np.arange(start, end, dtype=np.int64)[None, :],
                                   past, feeds)
    return int(np.argmax(logits[0, -1])), past


def child_transformers(a: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(a["threads"])
    from transformers import AutoModelForCausalLM

    from edgetune.export.sources import resolve_source

    source = resolve_source(a["model"])
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32, **kwargs).eval()
    loaded = time.time()

    def step(ids, past):
        with torch.no_grad():
            out = model(torch.from_numpy(ids), past_key_values=past, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    return {"loaded_at": loaded, **_decode(step, a, np)}


def _decode(step, a: dict, np) -> dict:
    """Greedy: the prompt, then one token per step; times of the first token and of the rest."""
    ids = np.array([a["prompt_ids"]], np.int64)
    token, past = step(ids, None)
    first, first_cpu = time.time(), _cpu()
    tokens = [token]
    for _ in range(a["new_tokens"] - 1):
        token, past = step(np.array([[token]], np.int64), past)
        tokens.append(token)
    return {"first_token_at": first, "first_token_cpu_s": first_cpu, "decode_s": time.time() - first,
            "decode_cpu_s": _cpu() - first_cpu, "tokens": tokens}


def _cpu() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_main(kind: str, payload: str) -> None:
    import resource

    a = json.loads(payload)
    r = {"edgetune": child_edgetune, "transformers": child_transformers}[kind](a)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    r["cpu_s"] = usage.ru_utime + usage.ru_stime
    print(RESULT_PREFIX + json.dumps(r), flush=True)


# --- parent ---------------------------------------------------------------------------------------
def run(kind: str, a: dict) -> dict:
    spawned = time.time()
    out = run_child([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(a)], parse_result=True)
    r = out["result"]
    steps = a["new_tokens"] - 1
    return {"first_token_s": r["first_token_at"] - spawned, "load_s": r["loaded_at"] - spawned,
            "tokens_per_s": steps / r["decode_s"], "cpu_s": r["cpu_s"], "first_token_cpu_s": r["first_token_cpu_s"],
            "decode_cpu_ms_per_token": 1000 * r["decode_cpu_s"] / steps, "peak_rss_bytes": out["ru_maxrss_bytes"],
            "tokens": r["tokens"]}


def prompt_ids(bundle: Path, prompt: str) -> list[int]:
    from edgetune.bundle import Bundle
    from edgetune.runtime.data import prompt_ids as render
    from edgetune.runtime.text import load_text

    tokenizer, template = load_text(Bundle.open(bundle, verify=False))
    return [int(i) for i in render([{"role": "user", "content": prompt}], tokenizer, template)]


def base_model(args, bundle: Path) -> str:
    from edgetune.bundle import Bundle
    from edgetune.export.sources import BUILTIN_MODELS, resolve_source

    manifest = Bundle.open(bundle, verify=False).manifest
    name = args.model or (manifest.base_model["id"] if manifest.base_model["id"] in BUILTIN_MODELS else None)
    if name is None:
        sys.exit(f"bench: the bundle's base model {manifest.base_model['id']!r} is not built in; give it with --model.")
    if resolve_source(name).sha256() != manifest.base_sha256:
        sys.exit(f"bench: --model {name} is not the bundle's base model; give the same model, or --skip-transformers.")
    return name


def render(result: dict) -> str:
    m = result["machine"]
    lines = [f"CPU: {m['cpu']}  SIMD: {', '.join(m['simd']) or 'none found'}  threads: {m['threads']}  "
             f"load average at start: {m['load_average_at_start']}",
             f"prompt: {result['prompt_tokens']} tokens, then {result['new_tokens']} greedy tokens",
             f"{'run':<22}{'first token s':>14}{'(CPU s)':>9}{'load s':>8}{'tokens/s':>10}{'CPU ms/token':>14}"
             f"{'CPU s':>8}{'peak RSS GB':>13}"]
    for name, r in result["runs"].items():
        lines.append(f"{name:<22}{r['first_token_s']:>14.2f}{r['first_token_cpu_s']:>9.2f}{r['load_s']:>8.2f}"
                     f"{r['tokens_per_s']:>10.1f}{r['decode_cpu_ms_per_token']:>14.1f}{r['cpu_s']:>8.2f}"
                     f"{r['peak_rss_bytes'] / 1e9:>13.3f}")
    ref = result["runs"].get("transformers")
    if ref:
        for name, r in result["runs"].items():
            if name != "transformers":
                same = sum(x == y for x, y in zip(r["tokens"], ref["tokens"]))
                lines.append(f"{name}: tokens/s {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x transformers' "
                             f"(CPU per token {r['decode_cpu_ms_per_token'] / ref['decode_cpu_ms_per_token']:.2f}x), peak RSS "
                             f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x; {same}/{len(ref['tokens'])} tokens "
                             "equal to transformers'")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-gen-") as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(tmp) / "bundle"
            print("bench: exporting the default model; about a minute", file=sys.stderr, flush=True)
            run_child([sys.executable, "-m", "edgetune.cli", "export", "--out", str(bundle), "--force"], parse_result=False)
        ids = prompt_ids(bundle, args.prompt)
        common = {"bundle": str(bundle), "threads": args.threads, "new_tokens": args.new_tokens, "prompt_ids": ids}
        runs = {}
        for compute in args.computes.split(","):
            for p in (bundle / CACHE_DIR).glob(f"generation-{compute}.*"):
                p.unlink()
            for start in ("cold", "warm"):
                runs[f"edgetune {compute} {start}"] = run("edgetune", {**common, "compute": compute})
        if not args.skip_transformers:
            runs["transformers"] = run("transformers", {**common, "model": base_model(args, bundle)})
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine.machine(args.threads),
              "versions": machine.versions(), "prompt": args.prompt, "prompt_tokens": len(ids),
              "new_tokens": args.new_tokens, "runs": runs}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()
