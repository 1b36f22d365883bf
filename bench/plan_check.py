"""Predicted vs measured peak RSS of the training step (``edgetune plan``'s memory model).

    python bench/plan_check.py --bundle cheap=b-cheap --bundle full=b-full [--configs 1x128,4x128,4x256]

For every bundle (exported with the recompute policy it is labelled with) and every batch x seq,
one child process runs ``edgetune train BUNDLE --batch-size B --max-seq-len T --steps S
--save-every 1`` on text records long enough that every example fills T tokens (so every
position carries a label), and the peak is the kernel's ru_maxrss of that process (wait4).
The prediction comes from ``edgetune.devices.plan.predict`` on the bundle's manifest.
Prints a table; the goal is |predicted / measured - 1| <= 15 %.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.spawn import run_child  # noqa: E402
from edgetune.bundle import Bundle  # noqa: E402
from edgetune.devices.plan import predict  # noqa: E402

MB = 1024 * 1024
# ~2,400 words of plain text: longer than any --max-seq-len planned here, so every example is cut
# to exactly that length.
LONG_RECORD = json.dumps({"text": "The quick brown fox jumps over the lazy dog near the river bank. " * 200}) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", action="append", required=True, help="LABEL=FOLDER (repeatable)")
    p.add_argument("--configs", default="1x128,4x128,4x256", help="comma-separated BATCHxSEQ")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",")]
    rows = []
    for spec in a.bundle:
        label, _, folder = spec.partition("=")
        manifest = Bundle.open(folder, verify=False).manifest
        for batch, seq in configs:
            pred = predict(manifest, batch, seq)
            with tempfile.TemporaryDirectory() as tmp:
                data = Path(tmp) / "long.jsonl"
                data.write_text(LONG_RECORD * (batch * a.steps))
                r = run_child([sys.executable, "-m", "edgetune.cli", "train", folder, "--data", str(data),
                               "--batch-size", str(batch), "--max-seq-len", str(seq), "--steps", str(a.steps),
                               "--save-every", "1", "--threads", str(a.threads), "--quiet",
                               "--state-dir", str(Path(tmp) / "state")], parse_result=False)
            row = {"bundle": label, "recompute": manifest.producer.get("memory", {}).get("recompute"),
                   "batch": batch, "seq": seq, "predicted_mb": pred.peak_bytes / MB,
                   "measured_mb": r["ru_maxrss_bytes"] / MB,
                   "parts_mb": {k: round(v / MB, 1) for k, v in pred.parts.items()}}
            row["error"] = row["predicted_mb"] / row["measured_mb"] - 1
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{when}, `edgetune train` with --threads {a.threads}, {a.steps} steps, a checkpoint after each, "
          "every position labelled")
    print("| recompute | batch x seq | predicted peak RSS | measured peak RSS | error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recompute']} | {r['batch']} x {r['seq']} | {r['predicted_mb']:.0f} MB | {r['measured_mb']:.0f} MB "
              f"| {100 * r['error']:+.1f} % |")
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error|: {100 * worst:.1f} % (goal: 15 %)")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
