"""Federated collection of deltas (collector service, aggregation, Flower apps) — not built yet.

Like ``edgetune.runtime``, this package must import without torch, transformers, peft or optimum.
"""
