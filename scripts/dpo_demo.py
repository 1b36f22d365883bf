"""The DPO demo on the default model: a preference for a fixed answer format, learnt on the device.

export --task dpo -> held-out preference metrics and answers before -> train on the preference pairs
(scripts/make_dpo_demo_data.py wrote them) -> the same after. Every step is a real edgetune command.

    python scripts/dpo_demo.py [--out b-dpo] [--steps 48] [--lr 1e-3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "edgetune" / "data"
TRAIN, HELD = DATA / "prefs-train.jsonl", DATA / "prefs-heldout.jsonl"
SHOWN = 4  # held-out prompts answered before and after


def edgetune(*args, capture: bool = False) -> str:
    cmd = ["edgetune", *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], text=True,
                       stdout=subprocess.PIPE if capture else None)
    if r.returncode != 0:
        sys.exit(r.returncode)
    if capture:
        print(r.stdout, end="")
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return r.stdout or ""


def answers(bundle: Path, prompts: list[str], threads: int, adapter: bool) -> list[str]:
    flags = [] if adapter else ["--no-adapter"]
    return [edgetune("generate", bundle, "--prompt", p, "--max-new-tokens", 24, "--threads", threads, *flags,
                     capture=True).strip() for p in prompts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("b-dpo"))
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if not args.out.exists():
        edgetune("export", "--task", "dpo", "--beta", 0.1, "--out", args.out)
    prompts = [json.loads(line)["prompt"] for line in HELD.read_text().splitlines()[:SHOWN]]
    before = answers(args.out, prompts, args.threads, adapter=False)
    edgetune("train", args.out, "--data", TRAIN, "--steps", args.steps, "--batch-size", 4, "--lr", args.lr,
             "--eval-data", HELD, "--eval-every", 12, "--threads", args.threads, "--restart", "--quiet")
    edgetune("eval", args.out, "--data", HELD, "--threads", args.threads)
    after = answers(args.out, prompts, args.threads, adapter=True)
    print("\nheld-out prompt | base model | after DPO")
    for p, b, a in zip(prompts, before, after):
        print(f"{p} | {b!r} | {a!r}")


if __name__ == "__main__":
    main()
