"""Shared fixtures: a tiny Llama folder and bundles exported from it (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def _export(source: Path, out: Path, **kwargs) -> Path:
    import dataclasses

    from edgetune.export.exporter import ExportOptions, export_bundle
    from edgetune.methods import get_method

    config_class = get_method(kwargs.get("method", "lora")).config_class  # its fields go to the method config
    fields = {f.name for f in dataclasses.fields(config_class)}
    config = config_class(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
    kwargs.setdefault("method_config", config)  # or given whole: method="adapter", method_config=AdapterConfig(...)
    export_bundle(ExportOptions(source=str(source), out=out, **kwargs))
    return out


@pytest.fixture(scope="session")
def export_tiny(tiny_model_dir, tmp_path_factory):
    """export_tiny(**options) -> bundle folder; identical options share one export."""
    cache: dict = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in cache:
            cache[key] = _export(tiny_model_dir, tmp_path_factory.mktemp("bundle") / "b", **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_bundle(export_tiny) -> Path:
    """fp32 base, LoRA r=8 alpha=16 on q_proj,v_proj."""
    return export_tiny(quantize="none")


@pytest.fixture(scope="session")
def tiny_bundle_int8(export_tiny) -> Path:
    return export_tiny(quantize="int8")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT encoder folder (tests/tiny_bert.py)."""
    from tests.tiny_bert import build_tiny_bert_dir

    return build_tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def export_tiny_bert(tiny_bert_dir, tmp_path_factory):
    """export_tiny_bert(**options) -> a sequence-classification bundle of the tiny BERT; identical options share one export."""
    cache: dict = {}

    def make(**kwargs) -> Path:
        kwargs = {"task": "sequence-classification", "labels": ("greet", "weather", "music"), **kwargs}
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in cache:
            cache[key] = _export(tiny_bert_dir, tmp_path_factory.mktemp("cls-bundle") / "b", **kwargs)
        return cache[key]

    return make
