"""How far ``export --compute int8`` moves one training step, per-tensor vs per-row activation scales.

    python bench/int8_error.py BUNDLE [--data FILE] [--examples 16] [--max-seq-len 256]

BUNDLE is an int8 bundle exported with the exact default (``--compute fp32``). The script copies
its artifacts twice into a temporary folder, rewrites the copies with
``export/compute_int8.py`` (``granularity`` tensor and row), and runs one forward/backward of the
ort-training backend on the same packed batch of real examples and the same adapter values
(B != 0, so every LoRA tensor has a gradient). It prints the loss and the relative gradient error
(||g_int8 - g|| / ||g|| over all trainable tensors, and the worst single tensor) of each variant.
Errors, not times: timing belongs to ``bench/run.py --compute-int8`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.realdata import edgetune_batches  # noqa: E402



def one_step(folder: Path, batch: dict, start: dict) -> tuple[float, dict[str, np.ndarray]]:
    from edgetune.bundle import Bundle
    from edgetune.runtime.backend import open_backend

    bundle = Bundle.open(folder, verify=False)  # the rewritten copies no longer match the manifest's hashes
    backend = open_backend("ort-training", bundle, training=False)
    backend.set_trainable(start)
    loss = backend.train_step(batch)
    grads = {t.graph_name: np.array(backend._state.parameters[t.graph_name].grad) for t in bundle.manifest.trainable}
    return loss, grads


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, default=HERE.parent / "edgetune" / "data" / "records-train.jsonl")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--variants", default="row,tensor,row-nohead,row-forward",
                   help="comma-separated: tensor|row, then -nohead (LM head exact) and/or -forward (input gradients exact)")
    p.add_argument("--variant", default=None,
                   help="run one variant in this process (the others run in their own processes: peak RSS per variant)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from edgetune.bundle import Bundle
    from edgetune.runtime.adapter_source import initial_adapter

    manifest = json.loads((args.bundle / "edgetune.json").read_text())
    if manifest["producer"].get("compute", {"matmul": "fp32"})["matmul"] != "fp32" or manifest["quantization"] != "int8":
        sys.exit(f"bench: {args.bundle} must be an int8 bundle exported with --compute fp32")
    batch = edgetune_batches({"bundle": str(args.bundle), "data": str(args.data), "examples": args.examples,
                              "warmup": 0, "steps": 1, "max_seq_len": args.max_seq_len})[0]
    rng = np.random.default_rng(7)
    start = {k: v + rng.normal(0, 0.02, v.shape).astype(np.float32)
             for k, v in sorted(initial_adapter(Bundle.open(args.bundle, verify=False)).items())}
    if args.variant is None:
        return run_all(args, argv or sys.argv[1:])
    folder = args.bundle
    with tempfile.TemporaryDirectory(prefix="edgetune-int8-") as tmp:
        if args.variant != "exact":
            from edgetune.export.compute_int8 import rewrite_artifacts

            folder = Path(tmp) / args.variant
            folder.mkdir()
            for path in args.bundle.iterdir():  # a copy: a bundle refuses symbolic links
                if path.is_file():
                    shutil.copy(path, folder / path.name)
                elif path.name == "checkpoint":
                    shutil.copytree(path, folder / path.name)
            granularity, *flags = args.variant.split("-")
            rewrite_artifacts(folder, granularity, head="nohead" not in flags, input_gradient="forward" not in flags)
        loss, grads = one_step(folder, batch, start)
    import resource

    np.savez(args.out, loss=loss, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             tokens=int((batch["attention_mask"] > 0).sum()), shape=np.array(batch["input_ids"].shape), **grads)


def run_all(args, argv) -> None:
    import subprocess

    results = {}
    with tempfile.TemporaryDirectory(prefix="edgetune-int8-") as tmp:
        for variant in ("exact", *args.variants.split(",")):
            out = Path(tmp) / f"{variant}.npz"
            subprocess.run([sys.executable, __file__, *argv, "--variant", variant, "--out", str(out)], check=True)
            print(f"{variant} done", file=sys.stderr, flush=True)
            results[variant] = dict(np.load(out))
    exact = results["exact"]
    names = [k for k in exact if k not in ("loss", "peak", "tokens", "shape")]
    print(f"one step on {int(exact['tokens'])} real tokens, batch {tuple(exact['shape'])}, {args.bundle}")
    print(f"{'variant':<16}{'loss':>10}{'loss rel err':>14}{'grad rel err':>14}{'worst tensor':>14}{'peak RSS':>12}")
    for variant, r in results.items():
        diff = np.sqrt(sum(float(np.sum((r[n] - exact[n]) ** 2)) for n in names))
        norm = np.sqrt(sum(float(np.sum(exact[n] ** 2)) for n in names))
        worst = max(float(np.linalg.norm(r[n] - exact[n]) / np.linalg.norm(exact[n])) for n in names)
        print(f"{variant:<16}{float(r['loss']):>10.5f}{abs(float(r['loss'] - exact['loss'])) / float(exact['loss']):>14.2e}"
              f"{diff / norm:>14.2e}{worst:>14.2e}{float(r['peak']) / 1e9:>10.2f} GB")


if __name__ == "__main__":
    main()
