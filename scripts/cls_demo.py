"""The classification demo: intents of short messages learnt on the device by all-MiniLM-L6-v2.

export --task sequence-classification -> held-out accuracy before -> train on the labelled messages
(scripts/make_cls_demo_data.py wrote them) -> held-out accuracy after, the step time and the training
process's peak RSS -> a few predictions. Every step is a real edgetune command.

    python scripts/cls_demo.py [--out b-cls] [--epochs 4] [--lr 2e-3] [--threads 0] [--method lora]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "edgetune" / "data"
TRAIN, HELD = DATA / "intents-train.jsonl", DATA / "intents-heldout.jsonl"
LABELS = "weather,music,alarm"
EXAMPLES = ["is it going to be foggy in Oslo tomorrow", "play some Bob Marley", "wake me at half past six"]


def edgetune(*args, capture: bool = False) -> tuple[str, float]:
    """Run one edgetune command; returns (stdout if captured, peak RSS of that process in MB)."""
    cmd = ["edgetune", *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", *map(str, args)], text=True,
                            stdout=subprocess.PIPE if capture else None)
    out = proc.stdout.read() if capture else ""
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss: KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    if capture:
        print(out, end="")
    print(f"  ({time.perf_counter() - t0:.1f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MB)", flush=True)
    return out, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("b-cls"))
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    edgetune("export", args.model, "--task", "sequence-classification", "--labels", LABELS, "--method", args.method,
             "--out", args.out, "--force")
    before = json.loads(edgetune("eval", args.out, "--data", HELD, "--json", "--threads", args.threads,
                                 capture=True)[0])["with_adapter"]
    _, train_rss = edgetune("train", args.out, "--data", TRAIN, "--epochs", args.epochs, "--batch-size", args.batch_size,
                            "--lr", args.lr, "--threads", args.threads, "--restart", "--quiet",
                            "--eval-data", HELD, "--eval-every", 9)
    after = json.loads(edgetune("eval", args.out, "--data", HELD, "--json", "--threads", args.threads,
                                capture=True)[0])["with_adapter"]
    edgetune("predict", args.out, *[a for text in EXAMPLES for a in ("--text", text)], "--threads", args.threads)
    rows = [json.loads(x) for x in (args.out / "train-state" / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    print("\n== sequence classification on the device ==")
    print(f"model {args.model}, method {args.method}, {sum(1 for _ in open(TRAIN))} training messages, "
          f"{int(after['examples'])} held out")
    print(f"held-out accuracy  {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    print(f"held-out macro-F1  {before['macro_f1']:.3f} -> {after['macro_f1']:.3f}")
    print(f"held-out loss      {before['loss']:.4f} -> {after['loss']:.4f}")
    print(f"training: {len(seconds)} steps of batch {args.batch_size}, median step {statistics.median(seconds):.3f} s, "
          f"peak RSS of the train process {train_rss:.0f} MB")


if __name__ == "__main__":
    main()
