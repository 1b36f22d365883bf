"""``EdgetuneStrategy``: Flower's FedAvg sampling and messaging, edgetune's admission and aggregation.

Flower's ``FedAvg`` picks the nodes and sends each the global adapter; every reply then goes
through the checks the HTTP collector runs on an upload (``admission.check_tensors``,
``update_weight``, ``bound_norm``: names, shapes, finite values, examples, L2 norm) and the
admitted ones through ``aggregate.aggregate`` (FedAvg / median / trimmed mean, tensor space or
LoRA product space with SVD re-factorisation). A refused reply is logged with its reason and left
out of the round, as the collector does; it does not fail the round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg

from edgetune.federated.admission import (AdmissionPolicy, StoreSpec, UpdateRefused, bound_norm, check_tensors,
                                          update_weight)
from edgetune.federated.aggregate import AggregationOptions, ClientUpdate, aggregate
from edgetune.federated.flower.arrays import from_record, to_record


@dataclass
class RoundRecord:
    """What one round received and produced (kept for reports and tests)."""

    round: int
    start: dict[str, np.ndarray]
    replies: list[tuple[int, dict[str, np.ndarray], int]] = field(default_factory=list)  # (node, adapter, examples)
    refused: list[tuple[int, str, str]] = field(default_factory=list)  # (node, reason, message)
    result: dict[str, np.ndarray] | None = None
    report: dict = field(default_factory=dict)


class EdgetuneStrategy(FedAvg):
    def __init__(self, spec: StoreSpec, policy: AdmissionPolicy, aggregation: AggregationOptions, **fedavg):
        super().__init__(**fedavg)
        self.spec, self.policy, self.aggregation = spec, policy, aggregation
        self.history: list[RoundRecord] = []
        self._current: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self._current = from_record(arrays)  # the global the replies must start from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        record = RoundRecord(server_round, self._current)
        admitted, contents = [], []
        for msg in valid:
            node = msg.metadata.src_node_id
            try:
                adapter, examples = self._read_reply(msg.content)
                record.replies.append((node, adapter, examples))
                check_tensors(adapter, self.spec)
                weight = update_weight(examples, 0, self.policy)
                adapter, _, _ = bound_norm(adapter, self._current, self.policy)
            except UpdateRefused as exc:
                log(WARNING, "edgetune: refused the reply of node %s (%s): %s", node, exc.reason, exc)
                record.refused.append((node, exc.reason, str(exc)))
                continue
            admitted.append(ClientUpdate(adapter, self._current, weight))
            contents.append(msg.content)
        self.history.append(record)
        if not admitted:
            log(WARNING, "edgetune: round %s admitted no update; the global adapter stays as it was", server_round)
            return None, None
        result = aggregate(self._current, admitted, self.aggregation)
        record.result, record.report = result.tensors, result.report
        log(INFO, "edgetune: round %s aggregated %s update(s) (%s, %s space), refused %s", server_round,
            len(admitted), result.report["aggregator"], result.report["space"], len(record.refused))
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics = MetricRecord({**dict(metrics or {}), "admitted": len(admitted), "refused": len(record.refused)})
        return to_record(result.tensors), metrics

    def _read_reply(self, content) -> tuple[dict[str, np.ndarray], int]:
        """The reply's adapter and example count; a reply without them is refused like a bad upload."""
        if "arrays" not in content or "metrics" not in content:
            raise UpdateRefused(400, "malformed", "the reply has no 'arrays' or no 'metrics' record.")
        examples = content["metrics"].get(self.weighted_by_key)
        if isinstance(examples, float) and examples.is_integer():
            examples = int(examples)
        if not isinstance(examples, int) or isinstance(examples, bool):
            raise UpdateRefused(422, "no_examples", f"the reply's {self.weighted_by_key} is {examples!r}, "
                                                    "not a whole number.")
        return from_record(content["arrays"]), examples
