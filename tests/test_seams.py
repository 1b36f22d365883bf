"""The method and backend seams: registries, validation order, adapter off, refused config keys."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import Bundle
from edgetune.errors import EdgetuneError

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


# --- backend seam ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "eval"])
def test_unknown_backend_is_reported_before_bundle_and_data(tmp_path, command):
    """Neither the bundle nor the data file exists: the backend is what the user hears about."""
    r = _cli(command, tmp_path / "no-bundle", "--data", tmp_path / "no-data.jsonl", "--backend", "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--backend 'nope'" in r.stderr and "auto, ort-training, portable" in r.stderr
    assert "no-data" not in r.stderr and "no-bundle" not in r.stderr


@pytest.mark.parametrize("command", ["train", "eval"])
def test_backend_checked_before_bundle_is_hashed(tiny_bundle, tmp_path, monkeypatch, command):
    from edgetune import bundle as bundle_module
    from edgetune.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    hashed = []
    real_hash = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: hashed.append(path) or real_hash(path))
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(tiny_bundle), "--data", str(data), "--backend", "nope"])
    assert exit_info.value.code == 2 and hashed == []
    Bundle.open(tiny_bundle)  # the control: opening the bundle does go through the patched hash
    assert hashed


def test_auto_prefers_the_training_build_then_portable(monkeypatch):
    from edgetune.runtime import backend

    assert backend.choose_backend("auto") == "ort-training"  # this environment has the training build
    entries = dict(backend._BACKENDS)
    monkeypatch.setattr(backend, "_BACKENDS", entries)
    for name, up in (("ort-training", False), ("portable", True)):
        entries[name] = backend._Entry(entries[name].factory, lambda up=up: up, entries[name].missing)
    assert backend.choose_backend("auto") == "portable"
    entries["portable"] = backend._Entry(entries["portable"].factory, lambda: False, "needs onnxruntime")
    with pytest.raises(EdgetuneError, match="auto found no backend.*ort-training: it needs onnxruntime-training-cpu"
                                            ".*portable: needs onnxruntime"):
        backend.choose_backend("auto")
    with pytest.raises(EdgetuneError, match="--backend ort-training: it needs onnxruntime-training-cpu"):
        backend.choose_backend("ort-training")


class _FakeBackend:
    name = "fake"

    def __init__(self, bundle, **options):
        self.bundle, self.options = bundle, options

    def initial_adapter(self):
        return {t.graph_name: np.full(t.shape, 7.0, np.float32) for t in self.bundle.manifest.trainable}


def test_registered_backend_opens_and_serves_the_initial_adapter(tiny_bundle, tmp_path, monkeypatch):
    from edgetune.runtime import backend
    from edgetune.runtime.adapter_source import latest_adapter

    monkeypatch.setattr(backend, "_BACKENDS", dict(backend._BACKENDS))
    backend.register_backend("fake", _FakeBackend, lambda: True)
    opened = Bundle.open(tiny_bundle)
    engine = backend.open_backend("fake", opened, threads=1, with_eval=True)
    assert engine.options == {"checkpoint": None, "threads": 1, "with_eval": True, "training": True}
    source = latest_adapter(opened, tmp_path / "empty-state", backend="fake")
    assert source.origin == "bundle's initial adapter"
    assert all((v == 7.0).all() for v in source.tensors.values()) and len(source.tensors) == len(opened.manifest.trainable)


def test_only_ort_backend_touches_the_training_build():
    """On the device half (everything but the exporter, which builds the artifacts with it)."""
    device = [p for p in (ROOT / "edgetune").rglob("*.py") if "export" not in p.relative_to(ROOT / "edgetune").parts]
    users = sorted(str(p.relative_to(ROOT)) for p in device
                   if "training_api" in p.read_text() or "onnxruntime.training import" in p.read_text())
    assert users == ["edgetune/runtime/ort_backend.py", "edgetune/runtime/ort_import.py"]


def test_bad_threads_refused_by_the_session_options():
    from edgetune.runtime.session_options import check_threads

    for bad in (-1, True, 1.5):
        with pytest.raises(EdgetuneError, match="--threads"):
            check_threads(bad)


# --- method seam ----------------------------------------------------------------------------------
def test_lora_adapter_off_zeroes_b_only_and_gives_the_base_model(tiny_bundle):
    """Off = B = 0 with A as given; the eval loss is then the same whatever A and B were."""
    from edgetune.methods import get_method
    from edgetune.runtime.backend import open_backend

    opened = Bundle.open(tiny_bundle)
    manifest, spec = opened.manifest, get_method("lora")
    ids = np.random.default_rng(0).integers(3, 100, (2, 10))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    roles = {t.graph_name: spec.role(t) for t in manifest.trainable}
    assert sorted(set(roles.values())) == ["lora_A", "lora_B"]
    losses = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        adapter = {t.graph_name: rng.normal(0, 0.5, t.shape).astype(np.float32) for t in manifest.trainable}
        off = spec.adapter_off(manifest, adapter)
        assert set(off) == set(adapter)
        for name, role in roles.items():
            if role == "lora_B":
                assert not off[name].any()
            else:
                np.testing.assert_array_equal(off[name], adapter[name])  # not "every tensor = 0"
        engine = open_backend("ort-training", opened, with_eval=True, training=False)
        engine.set_trainable(adapter)
        on_loss = engine.eval_loss(batch)
        engine.set_trainable(off)
        losses.append((on_loss, engine.eval_loss(batch)))
    (on1, off1), (on2, off2) = losses
    assert off1 == pytest.approx(off2, abs=1e-6) and abs(on1 - off1) > 1e-3


def test_lora_merge_is_scaling_b_at_a():
    from edgetune.methods import LoraConfig, get_method

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(5, 4))
    for config, scaling in ((LoraConfig(rank=4, alpha=8.0), 2.0), (LoraConfig(rank=4, alpha=8.0, use_rslora=True), 4.0)):
        np.testing.assert_allclose(get_method("lora").weight_delta(config, {"lora_A": a, "lora_B": b}), scaling * b @ a)


def test_unknown_method_config_keys_refused_by_name():
    from edgetune.methods import LoraConfig, config_from_dict

    with pytest.raises(EdgetuneError, match="unknown lora config key.*'dropuot'.*'ranks'"):
        config_from_dict("lora", {"rank": 8, "ranks": 4, "dropuot": 0.1})
    with pytest.raises(EdgetuneError, match="must be a JSON object"):
        LoraConfig.from_dict([])
    with pytest.raises(EdgetuneError, match="`rank`.*0.*`alpha`.*'x'.*`use_rslora`"):  # all problems at once
        LoraConfig(rank=0, alpha="x", use_rslora="yes")
    assert LoraConfig.from_dict(LoraConfig(rank=4, targets=("q_proj",)).to_dict()) == LoraConfig(rank=4, targets=("q_proj",))


def test_bundle_with_unknown_method_key_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "edgetune.json").read_text())
    manifest["method"]["config"]["lora_dropout_typo"] = 0.5
    (copy / "edgetune.json").write_text(json.dumps(manifest))
    r = _cli("inspect", copy)
    assert r.returncode == 2 and "'lora_dropout_typo'" in r.stderr and "Traceback" not in r.stderr


def test_export_options_belong_to_their_method(monkeypatch):
    """An option another method declares is refused for --method lora, naming lora's own options."""
    from edgetune import methods
    from edgetune.commands.export_cmds import method_config
    from edgetune.errors import ExportError
    from edgetune.methods import LoraConfig, MethodConfig, MethodSpec

    @dataclass
    class BottleneckConfig(MethodConfig):
        width: int = field(default=16, metadata={"help": "Bottleneck width.", "cli": "--width"})
        seed: int = field(default=0, metadata={"help": "Init seed.", "cli": "--seed"})
        name = "bottleneck"

    class BottleneckSpec(MethodSpec):
        name, config_class, tensor_roles = "bottleneck", BottleneckConfig, ("down", "up")

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    methods.register_method(BottleneckSpec())
    flags = {o.flag: o.methods for o in methods.cli_options()}
    assert flags["--width"] == ("bottleneck",) and {"bottleneck", "lora"} <= set(flags["--seed"])  # shared field, one flag
    with pytest.raises(ExportError, match="--width do\\(es\\) not apply to --method lora; its options are: "
                                          "--rank, --alpha, --targets, --rank-pattern, --alpha-pattern, --rslora, --seed"):
        method_config("lora", {"method_width": 8, "method_rank": 4})
    assert method_config("lora", {"method_rank": 4, "method_targets": "q_proj, k_proj", "method_use_rslora": False,
                                  "method_width": None}) == LoraConfig(rank=4, targets=("q_proj", "k_proj"))
    assert method_config("bottleneck", {"method_width": 8, "method_use_rslora": False}) == BottleneckConfig(width=8)


def test_export_refuses_bad_method_options_before_loading_anything(tmp_path):
    r = _cli("export", tmp_path / "no-model", "--out", tmp_path / "b", "--rank", "0", "--alpha", "-1")
    assert r.returncode == 2 and "`rank` must be a positive integer, got 0" in r.stderr and "`alpha`" in r.stderr
    assert "no-model" not in r.stderr and not (tmp_path / "b").exists()
    assert "[lora] LoRA rank" in _cli("export", "--help").stdout


def test_rank_and_alpha_patterns_parse_and_resolve_as_peft():
    """``--rank-pattern 'a=16, b=4'`` becomes PEFT's rank_pattern; the first matching key wins, matched at the path's end."""
    from edgetune.commands.export_cmds import method_config
    from peft.utils.other import get_pattern_key

    config = method_config("lora", {"method_targets": "all-linear", "method_rank_pattern": "down_proj=16, layers\\.1\\..*=4",
                                    "method_alpha_pattern": "o_proj=2.5"})
    assert config.rank_pattern == {"down_proj": 16, "layers\\.1\\..*": 4} and config.alpha_pattern == {"o_proj": 2.5}
    for path in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                 "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj", "model.layers.10.mlp.down_proj_x"):
        peft_key = get_pattern_key(config.rank_pattern.keys(), path)
        assert config.rank_of(path) == config.rank_pattern.get(peft_key, config.rank), path
    assert config.scaling_of("model.layers.0.self_attn.o_proj") == 2.5 / 8
    assert config.to_dict()["rank_pattern"] == {"down_proj": 16, "layers\\.1\\..*": 4}
