"""Federated collection of deltas: admission, aggregation, a durable store and the HTTP collector.

Like ``edgetune.runtime``, this package imports without torch, transformers, peft or optimum, and
without the ``[collect]`` extra (starlette/uvicorn are imported inside ``server``'s functions).
Modules: ``admission`` (checks), ``aggregate`` (FedAvg, robust means, LoRA products), ``privacy``
(DP), ``store`` (SQLite + blobs), ``collector`` (upload and round logic), ``server`` (HTTP),
``status``/``page`` (reports), ``bundle_io`` (init from a bundle, export to PEFT).
"""
