"""Where a training step's time goes: ONNX Runtime's profiler on one step of any bundle.

    python bench/profile_step.py BUNDLE [--backend portable|ort-training] [--batch 4 --seq 128]
                                 [--threads 1] [--warmup 1] [--top 20] [--json out.json]

Runs ``--warmup`` steps and then one profiled step on the bench's fixed random batch
(``bench/data.py``, as ``make bench`` trains), with ONNX Runtime's profiler on
(``SessionOptions.enable_profiling``), and prints the kernel time of the profiled step per operator
type and for the ``--top`` slowest nodes, each with its share of the step's summed kernel time.
It works on any bundle and either compute mode (``export --compute fp32|int8``): compare two
bundles by running it once on each.

``portable`` (default) runs the bundle's portable gradient graph in a plain ``InferenceSession``
with the options the trainer uses (``edgetune.runtime.session_options.training_options``), feeding
the checkpoint's trainable tensors; ``ort-training`` profiles the training build's Module (its
profile covers the forward-backward session only; AdamW is not run). Kernel times are summed per
node, so with more than one thread they count each node's wall time once, not its CPU time. Run
it with ``--threads 1`` on a loaded machine: the shares stay meaningful when the wall clock does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` and the repo's `edgetune`

from bench.data import make_batch  # noqa: E402


def _options(threads: int, prefix: str):
    from edgetune.runtime.session_options import training_options

    options = training_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    return options


def _feed_names(bundle):
    return [i.name for i in bundle.manifest.inputs], [np.dtype(i.dtype) for i in bundle.manifest.inputs]


def run_portable(bundle, batch, threads: int, warmup: int, prefix: str) -> tuple[Path, list[float]]:
    from edgetune.runtime.batches import graph_inputs
    from edgetune.runtime.ort_checkpoint import read_trainable
    from edgetune.runtime.ort_import import onnxruntime
    from edgetune.runtime.portable_backend import portable_graphs

    info = portable_graphs(bundle)
    names = [t.graph_name for t in bundle.manifest.trainable]
    session = onnxruntime().InferenceSession(str(bundle.path("portable")), _options(threads, prefix),
                                             providers=["CPUExecutionProvider"])
    input_names, dtypes = _feed_names(bundle)
    feed = dict(zip(input_names, graph_inputs(batch, input_names, dtypes)))
    feed.update(read_trainable(bundle.path("checkpoint"), names).params)
    outputs = [info["loss"], *(info["gradients"][n] for n in names)]
    times = []
    for _ in range(warmup + 1):
        t0 = time.perf_counter()
        session.run(outputs, feed)
        times.append(time.perf_counter() - t0)
    return Path(session.end_profiling()), times


def run_ort_training(bundle, batch, threads: int, warmup: int, prefix: str) -> tuple[Path, list[float]]:
    import gc

    from edgetune.runtime.batches import graph_inputs
    from edgetune.runtime.ort_import import training_api

    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(bundle.path("checkpoint")))
    module = api.Module(str(bundle.path("training")), state, None, session_options=_options(threads, prefix))
    module.train()
    input_names, dtypes = _feed_names(bundle)
    inputs = graph_inputs(batch, input_names, dtypes)
    times = []
    for _ in range(warmup + 1):
        t0 = time.perf_counter()
        module(*inputs)
        times.append(time.perf_counter() - t0)
    del module, state  # the training build writes its profile when the session is destroyed
    gc.collect()
    found = sorted(Path(prefix).parent.glob(Path(prefix).name + "*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"the training build wrote no profile under {prefix}*.json")
    return found[-1], times


def last_run_nodes(profile: Path) -> list[dict]:
    """The node kernel events of the profile's last ``model_run`` (the profiled step)."""
    events = json.loads(profile.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if not runs:
        raise SystemExit(f"{profile}: no model_run event")
    last = runs[-1]
    start, end = last["ts"], last["ts"] + last["dur"]
    return [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
            and start <= e["ts"] <= end]


def aggregate(nodes: list[dict]) -> dict:
    by_op: dict[str, list] = defaultdict(lambda: [0, 0])  # op type -> [microseconds, nodes]
    by_node: dict[str, list] = defaultdict(lambda: ["", 0])  # node -> [op type, microseconds]
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        by_op[op][0] += e["dur"]
        by_op[op][1] += 1
        name = e["name"][: -len("_kernel_time")]
        by_node[name][0] = op
        by_node[name][1] += e["dur"]
    total = sum(v[0] for v in by_op.values()) or 1
    ops = sorted(({"op": k, "ms": v[0] / 1e3, "share": v[0] / total, "nodes": v[1]} for k, v in by_op.items()),
                 key=lambda r: -r["ms"])
    top = sorted(({"node": k, "op": v[0], "ms": v[1] / 1e3, "share": v[1] / total} for k, v in by_node.items()),
                 key=lambda r: -r["ms"])
    return {"kernel_ms": total / 1e3, "op_types": ops, "nodes": top}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("bundle", help="a bundle folder (edgetune export --out)")
    p.add_argument("--backend", choices=("portable", "ort-training"), default="portable")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt-fraction", type=float, default=0.25, help="share of each row without labels (bench default)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="unprofiled steps first (they are recorded, then skipped)")
    p.add_argument("--top", type=int, default=20, help="how many op types and nodes to list")
    p.add_argument("--json", type=Path, help="also write the aggregates here")
    args = p.parse_args(argv)
    if min(args.batch, args.seq, args.top) < 1 or args.threads < 0 or args.warmup < 0:
        p.error("--batch, --seq and --top must be >= 1; --threads and --warmup >= 0")

    from edgetune.bundle import Bundle

    bundle = Bundle.open(args.bundle, verify=False)
    batch = make_batch(bundle.manifest.base_model["config"]["vocab_size"], args.batch, args.seq, args.prompt_fraction)
    run = run_portable if args.backend == "portable" else run_ort_training
    with tempfile.TemporaryDirectory() as tmp:
        profile, times = run(bundle, batch, args.threads, args.warmup, str(Path(tmp) / "profile"))
        result = aggregate(last_run_nodes(profile))
    compute = (bundle.manifest.producer or {}).get("compute") or {"matmul": "fp32"}
    result.update(bundle=str(args.bundle), backend=args.backend, compute=compute, threads=args.threads,
                  batch=args.batch, seq=args.seq, step_seconds=times)
    print(f"{args.bundle}: {args.backend}, compute {compute.get('matmul')}, {args.batch} x {args.seq}, "
          f"{args.threads} thread(s); steps {', '.join(f'{t:.2f}' for t in times)} s (last one profiled); "
          f"kernel time of the profiled step {result['kernel_ms'] / 1e3:.2f} s")
    print("\n| op type | nodes | ms | share |\n|---|---|---|---|")
    for r in result["op_types"][: args.top]:
        print(f"| {r['op']} | {r['nodes']} | {r['ms']:.1f} | {r['share']:.1%} |")
    print("\n| node | op type | ms | share |\n|---|---|---|---|")
    for r in result["nodes"][: args.top]:
        print(f"| {r['node']} | {r['op']} | {r['ms']:.1f} | {r['share']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
