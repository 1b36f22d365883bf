"""The Flower ``ServerApp``: rounds of ``EdgetuneStrategy`` starting from the bundle's initial adapter.

The server reads the bundle for what every reply must fit (base model, method, adapter layout)
and for the round-0 global adapter; the final global can be written as a full ``.etd`` delta
(``global-out``), which ``edgetune to-peft`` turns into a PEFT adapter.
"""

from __future__ import annotations


from edgetune.federated.flower.config import merged


def build_strategy(config: dict, manifest):
    """An ``EdgetuneStrategy`` for ``manifest``'s bundle, configured from the run config."""
    from edgetune.federated.admission import AdmissionPolicy, StoreSpec
    from edgetune.federated.aggregate import AggregationOptions, space_for
    from edgetune.federated.flower.strategy import EdgetuneStrategy

    method = {"name": manifest.method["name"], "config": manifest.method["config"]}
    spec = StoreSpec(manifest.base_sha256, method, manifest.trainable_shapes())
    policy = AdmissionPolicy(max_norm=config["max-norm"] or None, norm_policy=config["norm-policy"],
                             max_examples=config["max-examples"] or None)
    space = space_for(method, spec.layout) if config["space"] == "auto" else config["space"]
    options = AggregationOptions(aggregator=config["aggregator"], trim=config["trim"], space=space,
                                 rank=method["config"].get("rank"))
    return EdgetuneStrategy(spec, policy, options, fraction_train=config["fraction-train"], fraction_evaluate=0.0,
                            min_train_nodes=config["min-nodes"], min_available_nodes=config["min-nodes"])


def run_rounds(grid, config: dict, strategy=None):
    """Run ``num-server-rounds`` rounds; returns Flower's ``Result`` (``.arrays``: the final global)."""
    from edgetune.bundle import Bundle
    from edgetune.federated.flower.arrays import from_record, to_record
    from edgetune.runtime.adapter_source import initial_adapter

    bundle = Bundle.open(config["bundle"])
    manifest = bundle.manifest
    strategy = strategy or build_strategy(config, manifest)
    initial = initial_adapter(bundle)
    start = {t.peft_key: initial[t.graph_name] for t in manifest.trainable}
    result = strategy.start(grid=grid, initial_arrays=to_record(start), num_rounds=config["num-server-rounds"])
    if config["global-out"]:
        from edgetune.delta import write_delta

        write_delta(config["global-out"], from_record(result.arrays), base_model_sha256=manifest.base_sha256,
                    method={"name": manifest.method["name"], "config": manifest.method["config"]}, codec="fp32",
                    round_id=str(config["num-server-rounds"]), producer={"engine": "flower"})
    return result


def _make_app():
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, merged(context.run_config))

    return app


app = _make_app()
