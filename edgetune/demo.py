"""``make demo``: the whole story on the default model, with the real commands.

export (int8 SmolLM2-135M + LoRA) -> held-out answers and eval loss before -> train on the
shipped record-format dataset -> the same after -> the delta that would leave the device. The task (turn a sentence into
``name=..; age=..; city=..``) is one the base model does not follow, so the held-out exact-match
rate shows what on-device fine-tuning changed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

TRAIN = "records-train.jsonl"
HELDOUT = "records-heldout.jsonl"
SHOWN = 4  # held-out answers printed before/after


def run(*args: str) -> None:
    cmd = ["edgetune", *args]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "edgetune.cli", *args])
    if code != 0:
        sys.exit(code)
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)


def heldout_answers(bundle: Path, records: list[dict], use_adapter: bool) -> list[str]:
    from edgetune.bundle import Bundle
    from edgetune.runtime.answer import Answerer

    answerer = Answerer(Bundle.open(bundle, verify=False))
    return [answerer(f"{r['instruction']}\n\n{r['context']}", max_new_tokens=24, use_adapter=use_adapter) for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--compute", choices=("fp32", "int8"), default="fp32",
                        help="export --compute: int8 runs the frozen projections as int8 GEMMs (README, Performance)")
    args = parser.parse_args()
    import json

    data = resources.files("edgetune") / "data"
    train_path, held_path = Path(str(data / TRAIN)), Path(str(data / HELDOUT))
    records = [json.loads(line) for line in held_path.read_text().splitlines() if line.strip()]
    bundle = args.out / "bundle"
    args.out.mkdir(parents=True, exist_ok=True)

    run("export", "--out", str(bundle), "--force", *(["--compute", args.compute] if args.compute != "fp32" else []))
    before = heldout_answers(bundle, records, use_adapter=False)
    run("eval", str(bundle), "--data", str(held_path))
    run("train", str(bundle), "--data", str(train_path), "--steps", str(args.steps), "--batch-size", "8",
        "--lr", "1e-3", "--warmup", "5", "--max-seq-len", "128", "--restart")
    run("eval", str(bundle), "--data", str(held_path))
    after = heldout_answers(bundle, records, use_adapter=True)

    for codec in ("fp16", "int8"):
        run("delta", str(bundle), "--out", str(args.out / f"update-{codec}.etd"), "--codec", codec)
    run("delta", "inspect", str(args.out / "update-int8.etd"))

    print("\nheld-out answers (names and cities never seen in training):")
    for r, b, a in list(zip(records, before, after))[:SHOWN]:
        print(f"  input : {r['context']}\n  want  : {r['output']}\n  before: {b!r}\n  after : {a!r}\n")
    exact = lambda answers: sum(a == r["output"] for a, r in zip(answers, records))  # noqa: E731
    print(f"held-out exact match: before {exact(before)}/{len(records)}, after {exact(after)}/{len(records)}")
    prompt = f"{records[0]['instruction']}\n\n{records[0]['context']}"
    print(f"\ntry it: edgetune generate {bundle} --prompt {shlex.quote(prompt)} [--no-adapter]")


if __name__ == "__main__":
    main()
