"""The Flower run configuration (``[tool.flwr.app.config]``, ``flwr run --run-config``), checked once.

Keys are Flower's kebab-case. A SuperNode's own ``--node-config`` wins over the run config for
``bundle`` and ``data`` (each device names its local files); in a simulation, ``partition-id`` and
``num-partitions`` split one data file among the virtual nodes (line i goes to node i mod n).
"""

from __future__ import annotations

from edgetune.errors import EdgetuneError

DEFAULTS = {
    "bundle": "bundle",  # the exported bundle folder (the same export on every node)
    "data": "",  # JSONL training data on the node
    "num-server-rounds": 3,
    "local-steps": 5,  # optimizer steps per round on each node
    "lr": 2e-4,
    "batch-size": 4,
    "max-seq-len": 256,
    "threads": 1,
    "seed": 0,
    "fraction-train": 1.0,
    "min-nodes": 2,
    "aggregator": "fedavg",  # fedavg | median | trimmed-mean
    "trim": 0.1,
    "space": "auto",  # auto (tensor for FFA-LoRA, lora-product otherwise) | tensor | lora-product
    "max-norm": 0.0,  # 0: no bound on an update's L2 norm
    "norm-policy": "refuse",  # clip | refuse
    "max-examples": 0,  # 0: no bound
    "global-out": "",  # write the final global adapter here as a full .etd delta ("" = do not)
}


def merged(run_config, node_config=None) -> dict:
    """DEFAULTS overridden by the run config, then by the node's ``bundle``/``data``; types checked."""
    config = {**DEFAULTS, **dict(run_config or {})}
    for key in ("bundle", "data"):
        if node_config and key in node_config:
            config[key] = node_config[key]
    problems = []
    for key, default in DEFAULTS.items():
        value = config[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            config[key] = value = float(value)
        if type(value) is not type(default):
            problems.append(f"{key} must be {type(default).__name__}, got {value!r}")
    if problems:
        raise EdgetuneError("Flower run config: " + "; ".join(problems) + ".")
    return config
