"""How to aggregate LoRA across devices, measured: eval loss after K federated rounds (a benchmark).

    python bench/lora_aggregation.py [--model tiny|default|PATH] [--clients 5] [--rounds 4] [--local-steps 5]

Three ways, same devices, same data, same training settings:
  ffa-fedavg       `export --freeze-a`: A fixed at its seeded init, devices train B only; FedAvg of B
                   (exact: mean(B_i) A = mean(B_i A)); uploads carry B only
  separate-fedavg  A and B both trained; FedAvg of A and of B separately (mean(B_i) mean(A_i), which
                   is not the mean of the devices' updates B_i A_i)
  product-svd      A and B both trained; FedAvg of the products B_i A_i per layer, re-factorised to
                   rank r with a truncated SVD (edgetune.federated.aggregate, space "lora-product")

Data: the packaged record-extraction task (edgetune/data/records-train.jsonl), split non-IID
across the devices by the city in each record (each device sees a few cities); eval loss on the
held-out file (records-heldout.jsonl) with the global adapter after every round. Each device
round = `local-steps` AdamW steps from the global adapter with fresh moments (as `edgetune sync`),
run by edgetune's on-device runtime (ONNX Runtime training).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "edgetune" / "data"
WAYS = {"ffa-fedavg": (True, "tensor"), "separate-fedavg": (False, "tensor"), "product-svd": (False, "lora-product")}


def export(model: str, out: Path, freeze_a: bool, rank: int, targets: tuple[str, ...]) -> Path:
    from edgetune.export.exporter import ExportOptions, export_bundle
    from edgetune.methods import LoraConfig

    source = None if model == "default" else model
    export_bundle(ExportOptions(source=source, out=out, quantize="none" if model != "default" else "int8",
                                method_config=LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets, freeze_a=freeze_a)))
    return out


def split_by_city(clients: int, folder: Path) -> list[Path]:
    """Non-IID shares: every record goes to the device its city is assigned to (cities dealt round-robin)."""
    lines = [line for line in (DATA / "records-train.jsonl").read_text().splitlines() if line.strip()]
    cities = sorted({re.search(r"city=([^;\"]+)", json.loads(line)["output"]).group(1) for line in lines})
    owner = {city: i % clients for i, city in enumerate(cities)}
    shares = [[] for _ in range(clients)]
    for line in lines:
        shares[owner[re.search(r"city=([^;\"]+)", json.loads(line)["output"]).group(1)]].append(line)
    paths = []
    for i, share in enumerate(shares):
        paths.append(folder / f"device-{i}.jsonl")
        paths[-1].write_text("\n".join(share) + "\n")
    return paths


def run_way(bundle: Path, space: str, shares: list[Path], args, lr: float) -> dict:
    from edgetune.bundle import Bundle
    from edgetune.delta import encode_delta
    from edgetune.federated.aggregate import AggregationOptions, ClientUpdate, aggregate
    from edgetune.federated.flower.client_app import train_on_node
    from edgetune.federated.flower.config import merged
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.evaluate import evaluate

    bundle = Bundle.open(bundle)
    manifest = bundle.manifest
    start = initial_adapter(bundle)
    glob = {t.peft_key: start[t.graph_name] for t in manifest.trainable}
    options = AggregationOptions(space=space, rank=manifest.method["config"]["rank"])
    method = {"name": manifest.method["name"], "config": manifest.method["config"]}

    def eval_loss(tensors):
        by_graph = {t.graph_name: tensors[t.peft_key] for t in manifest.trainable}
        r = evaluate(bundle, DATA / "records-heldout.jsonl", batch_size=4, max_seq_len=128, threads=args.threads,
                     adapter=by_graph)
        return r["with_adapter"]["loss"], r["without_adapter"]["loss"]

    losses, energies, upload = [], [], 0
    base_loss = eval_loss(glob)[1]
    for k in range(args.rounds):
        updates = []
        for i, share in enumerate(shares):
            config = merged({"bundle": str(bundle.folder), "data": str(share), "local-steps": args.local_steps, "lr": lr,
                             "batch-size": 4, "max-seq-len": 128, "threads": args.threads, "seed": i})
            adapter, examples, _ = train_on_node(glob, config, round_number=k)
            updates.append(ClientUpdate(adapter, glob, float(examples)))
            upload = len(encode_delta({key: adapter[key] - glob[key] for key in glob}, base_model_sha256=manifest.base_sha256,
                                      method=method, codec="fp16", kind="diff", since_sha256="0" * 64))
        result = aggregate(glob, updates, options)
        glob = result.tensors
        energies.append(result.report.get("discarded_energy_max"))
        losses.append(eval_loss(glob)[0])
        print(f"  round {k + 1}: eval loss {losses[-1]:.4f}"
              + (f", SVD discarded energy (max layer) {energies[-1]:.2e}" if energies[-1] is not None else ""),
              flush=True)
    return {"base_loss": base_loss, "losses": losses, "discarded_energy_max": energies, "upload_bytes": upload}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (a random tiny Llama built here), default, or a model path")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--ffa-lr", type=float, default=None, help="learning rate for ffa-fedavg (default: --lr)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {', '.join(WAYS)}")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    ways = [w for w in args.ways.split(",") if w]
    if not ways or any(w not in WAYS for w in ways):
        parser.error(f"--ways must name some of {', '.join(WAYS)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgetune-lora-agg-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model == "tiny":
            sys.path.insert(0, str(ROOT))
            from tests.tiny_model import build_tiny_model_dir

            model = str(build_tiny_model_dir(tmp / "tiny-llama"))
        bundles = {freeze: export(model, tmp / f"bundle-{'ffa' if freeze else 'plain'}", freeze, args.rank, targets)
                   for freeze in sorted({WAYS[w][0] for w in ways})}
        shares = split_by_city(args.clients, tmp)
        results = {}
        for way in ways:
            freeze, space = WAYS[way]
            lr = args.ffa_lr if freeze and args.ffa_lr is not None else args.lr
            print(f"{way} (lr {lr:g}):", flush=True)
            results[way] = run_way(bundles[freeze], space, shares, args, lr)
            results[way]["lr"] = lr
    figures = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": "python bench/lora_aggregation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "seconds": round(time.perf_counter() - t0, 1), "results": results}
    print(f"\n| aggregation | lr | eval loss after {args.rounds} rounds | per round | upload per device (fp16) |")
    print("|---|---|---|---|---|")
    base = next(iter(results.values()))["base_loss"]
    for way, r in results.items():
        print(f"| {way} | {r['lr']:g} | {r['losses'][-1]:.4f} | {' '.join(f'{x:.3f}' for x in r['losses'])} | {r['upload_bytes']:,} B |")
    print(f"base model (adapter off): {base:.4f}; {args.clients} devices, {args.local_steps} local steps, lr {args.lr}, "
          f"rank {args.rank} on {args.targets}; {figures['seconds']} s; {figures['date']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
