"""The Flower ``ClientApp``: edgetune's on-device runtime behind Flower's Message API.

On a ``train`` message carrying ``arrays`` (the global adapter, PEFT key -> array) and ``config``:
import the arrays as the step-0 checkpoint of a fresh training state, run ``local-steps`` AdamW
steps on the node's data, reply with ``arrays`` (the trained adapter) and ``metrics``
(``num-examples`` — FedAvg's weight — and the last ``train-loss``). Each round starts from the
received global with fresh optimizer moments, as a device does after ``edgetune sync``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgetune.federated.flower.arrays import from_record, to_record
from edgetune.federated.flower.config import merged


def train_on_node(start: dict[str, np.ndarray], config: dict, node_config: dict | None = None,
                  round_number: int = 0) -> tuple[dict[str, np.ndarray], int, float | None]:
    """(trained adapter by PEFT key, number of examples, last loss) after training from ``start``."""
    from edgetune.bundle import Bundle
    from edgetune.errors import EdgetuneError
    from edgetune.runtime.adapter_source import check_adapter, latest_adapter
    from edgetune.runtime.import_adapter import import_adapter
    from edgetune.runtime.trainer import TrainOptions, train

    bundle = Bundle.open(config["bundle"])
    manifest = bundle.manifest
    by_graph = {t.graph_name: start.get(t.peft_key) for t in manifest.trainable if t.peft_key in start}
    check_adapter(manifest, by_graph)
    with tempfile.TemporaryDirectory(prefix="edgetune-flower-") as tmp:
        data = _node_data(Path(config["data"]), node_config or {}, Path(tmp))
        state = Path(tmp) / "state"
        import_adapter(bundle, by_graph, f"Flower round {round_number}", state_dir=state, force=True)
        opts = TrainOptions(data=data, steps=config["local-steps"], batch_size=config["batch-size"],
                            max_seq_len=config["max-seq-len"], lr=config["lr"], seed=config["seed"] + round_number,
                            threads=config["threads"], save_every=config["local-steps"], resume=True, state_dir=state)
        result = train(bundle, opts, progress=False, log=lambda message: None)
        trained = latest_adapter(bundle, state)
    if not result.losses:
        raise EdgetuneError("the node trained no steps; set local-steps > 0.")
    tensors = {t.peft_key: trained.tensors[t.graph_name] for t in manifest.trainable}
    return tensors, int(trained.trainer["num_examples"]), result.losses[-1]


def _node_data(path: Path, node_config: dict, tmp: Path) -> Path:
    """The node's data: the whole file, or in a simulation its share (line i to node i mod n)."""
    from edgetune.errors import DataError

    if not path.is_file():
        raise DataError(f"Flower config data={str(path)!r} is not a file on this node; give a JSONL file "
                        "(--run-config 'data=\"...\"' or the SuperNode's --node-config).")
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        return path
    pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    share = lines[pid::n]
    if not share:
        raise DataError(f"{path} has {len(lines)} records, too few for {n} simulated nodes.")
    out = tmp / f"partition-{pid}.jsonl"
    out.write_text("\n".join(share) + "\n")
    return out


def handle_train(msg, context, overrides: dict | None = None):
    """The reply to one ``train`` message (``overrides``: run-config values set in code, e.g. by tests)."""
    from flwr.app import Message, MetricRecord, RecordDict

    config = merged({**dict(context.run_config), **(overrides or {})}, context.node_config)
    round_number = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
    tensors, examples, loss = train_on_node(from_record(msg.content["arrays"]), config, dict(context.node_config),
                                            round_number)
    metrics = {"num-examples": examples, "train-loss": float(loss)}
    return Message(content=RecordDict({"arrays": to_record(tensors), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _make_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(handle_train)
    return app


app = _make_app()
