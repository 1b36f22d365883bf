"""Device profiles, the memory plan, `train --device` refusals and `train --emulate` caps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.devices.profile import ProfileError, get_profile, load_profiles, parse_profile, profiles_folder

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
SHIPPED = sorted(p.stem for p in (REPO / "devices").glob("*.toml"))
PROFILE = """title = "test device"
os = "linux"
arch = "x86_64"
cores = 2
threads = 1
backends = ["ort-training", "portable"]
ort_format_required = false
[memory]
ram_mb = 65536
app_mb = {app_mb}
source = "test budget"
[throughput]
gflops = 100.0
source = "test figure"
"""


def write_profile(folder: Path, name: str, app_mb: int) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(PROFILE.format(app_mb=app_mb))
    return path


# Runs argv[2:] and writes its wait4 ru_maxrss to argv[1]. The CLI is started from this small
# process, not from pytest: a child's ru_maxrss keeps the resident size it had before exec, i.e. a
# fork of pytest (with torch loaded) would report pytest's size.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, s, u = os.wait4(p.pid, 0); "
            "open(sys.argv[1], 'w').write(str(u.ru_maxrss * 1024)); sys.exit(os.waitstatus_to_exitcode(s))")


def edgetune(*args) -> tuple[int, str, str, int]:
    """Run the CLI in a child; (exit code, stdout, stderr, peak RSS of it and the children it waited for)."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(peak), sys.executable, "-m", "edgetune.cli",
                               *map(str, args)], env=env, capture_output=True, text=True)
        return proc.returncode, proc.stdout, proc.stderr, int(peak.read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_parses_and_validates(name):
    p = get_profile(name)
    assert p.name == name and p.app_mb < p.ram_mb and p.threads <= p.cores and p.gflops > 0
    assert p.app_mb_source.strip() and p.gflops_source.strip()
    if "ort-training" in p.backends:
        assert p.arch == "x86_64" and p.os == "linux"
    # the mobile phone classes read ORT-format models; the Linux boards and laptop do not need it
    assert p.ort_format_required == (p.os in ("android", "ios"))


def test_the_six_device_classes_are_shipped_and_found_from_the_checkout():
    assert profiles_folder() == REPO / "devices"
    assert {"rpi4-4gb", "rpi-zero2w", "jetson-orin-nano-8gb", "android-midrange-6gb", "iphone-class-6gb",
            "laptop-16gb"} <= set(load_profiles())


def test_a_broken_profile_is_refused_with_every_problem(tmp_path):
    text = PROFILE.format(app_mb=70000).replace('arch = "x86_64"', 'arch = "aarch64"').replace(
        "threads = 1", "threads = 8").replace('source = "test figure"', 'source = ""').replace(
        'backends = ["ort-training", "portable"]', 'backends = ["ort-training", "tflite"]')
    with pytest.raises(ProfileError) as err:
        parse_profile(text, tmp_path / "broken.toml")
    message = str(err.value)
    for problem in ("threads (8) exceeds cores (2)", "app_mb (70000) must be below", "throughput.source",
                    "['tflite'] not known", "ort-training runs only on x86_64 Linux"):
        assert problem in message, problem
    assert "broken.toml" in message


def test_a_profile_missing_fields_and_with_unknown_keys_is_refused(tmp_path):
    with pytest.raises(ProfileError, match=r"unknown keys \['colour'\].*missing memory.app_mb"):
        parse_profile('colour = "red"\n' + PROFILE.format(app_mb=1).replace("app_mb = 1\n", ""),
                      tmp_path / "x.toml")
    with pytest.raises(ProfileError, match="not valid TOML"):
        parse_profile("title = ", tmp_path / "y.toml")


def test_devices_commands():
    code, out, _, _ = edgetune("devices", "list")
    assert code == 0 and all(name in out for name in SHIPPED)
    code, out, _, _ = edgetune("devices", "show", "iphone-class-6gb")
    assert code == 0 and "increased-memory-limit" in get_profile("iphone-class-6gb").app_mb_source + out
    code, _, err, _ = edgetune("devices", "show", "toaster")
    assert code == 2 and "rpi4-4gb" in err and "Traceback" not in err


def test_plan_grows_with_batch_and_length_and_follows_the_memory_plan(export_tiny):
    from edgetune.bundle import Bundle
    from edgetune.devices.plan import predict, stored_activations, ModelShape

    full = Bundle.open(export_tiny(quantize="none", recompute="full"), verify=False).manifest
    none = Bundle.open(export_tiny(quantize="none", recompute="none"), verify=False).manifest
    peaks = [[predict(full, b, s).peak_bytes for s in (32, 64, 128)] for b in (1, 2, 4)]
    assert all(row == sorted(row) and len(set(row)) == 3 for row in peaks)
    assert [r[0] for r in peaks] == sorted(r[0] for r in peaks)
    assert predict(none, 4, 128).parts["step"] > predict(full, 4, 128).parts["step"]
    m = ModelShape.from_manifest(full)
    # the stored residual stream alone: 2L+1 tensors of (B, T, hidden) fp32
    assert stored_activations(m, "full", 2, 64) == (2 * m.layers + 1) * 2 * 64 * m.hidden * 4


@pytest.mark.parametrize("field, value", [("head_slices", "many"), ("loss_chunks", -3), ("recompute", "some")])
def test_plan_refuses_a_malformed_memory_plan_in_the_manifest(tiny_bundle, tmp_path, field, value):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "edgetune.json").read_text())
    manifest["producer"]["memory"][field] = value
    (bundle / "edgetune.json").write_text(json.dumps(manifest))
    code, _, err, _ = edgetune("plan", bundle, "--device", "laptop-16gb")
    assert code == 2 and "Traceback" not in err and field in err and "re-export" in err, err


def test_plan_command_prints_the_largest_fitting_configuration(tiny_bundle, tmp_path):
    from edgetune.bundle import Bundle
    from edgetune.devices.plan import predict

    manifest = Bundle.open(tiny_bundle, verify=False).manifest
    budget = predict(manifest, 2, 64).peak_bytes // MB + 1
    profile = write_profile(tmp_path, "dev", budget)
    code, out, err, _ = edgetune("plan", tiny_bundle, "--device", profile, "--batches", "1,2,4", "--seqs", "32,64,128")
    assert code == 0, err
    best = max(((b, s) for b in (1, 2, 4) for s in (32, 64, 128) if predict(manifest, b, s).peak_bytes <= budget * MB),
               key=lambda c: (c[0] * c[1], c[1]))
    assert f"largest that fits: --batch-size {best[0]} --max-seq-len {best[1]}" in out


def _data(path: Path, lengths: list[int]) -> Path:
    words = "the quick brown fox jumps over the lazy dog".split()
    path.write_text("".join(json.dumps({"text": " ".join(words[i % 9] for i in range(n))}) + "\n" for n in lengths))
    return path


def test_a_configuration_predicted_not_to_fit_is_refused_before_the_first_step(tiny_bundle, tmp_path):
    profile = write_profile(tmp_path, "small", 64)  # less than the runtime itself
    state = tmp_path / "state"
    code, _, err, _ = edgetune("train", tiny_bundle, "--data", _data(tmp_path / "d.jsonl", [40] * 8), "--steps", 2,
                               "--state-dir", state, "--device", profile)
    assert code == 2 and "predicted to need" in err and "small lets an app use 64 MB" in err, err
    assert "Traceback" not in err
    assert not state.exists()  # no step ran, no checkpoint or metrics were written


def test_plan_picks_a_configuration_that_trains_under_emulate_within_the_cap(tiny_bundle, tmp_path):
    from edgetune.bundle import Bundle
    from edgetune.devices.plan import grid, largest_fitting, predict

    manifest = Bundle.open(tiny_bundle, verify=False).manifest
    budget_mb = predict(manifest, 4, 64).peak_bytes // MB + 1
    best = largest_fitting(grid(manifest, (1, 2, 4, 8), (32, 64, 128)), budget_mb * MB)
    assert best is not None and best.tokens >= 4 * 64
    profile = write_profile(tmp_path, "dev", budget_mb)
    code, _, err, peak = edgetune(
        "train", tiny_bundle, "--data", _data(tmp_path / "d.jsonl", [best.seq * 2] * (2 * best.batch)),
        "--batch-size", best.batch, "--max-seq-len", best.seq, "--steps", 2, "--state-dir", tmp_path / "s",
        "--device", profile, "--emulate", profile)
    assert code == 0, err
    assert "memory cap" in err
    assert peak <= budget_mb * MB, (peak / MB, budget_mb)


def _wide_model(folder: Path) -> Path:
    """A tiny Llama whose activations, not its runtime, dominate memory at 512 tokens."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.tiny_model import tiny_llama_config
    from tests.tiny_tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer

    folder.mkdir(parents=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = tiny_llama_config(tokenizer.get_vocab_size())
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 1024, 4
    config.max_position_embeddings = 1024
    config.eos_token_id = tokenizer.get_vocab()["<|im_end|>"]
    config.pad_token_id = tokenizer.get_vocab()["<|endoftext|>"]
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML_TEMPLATE,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 1024}))
    return folder


def test_emulate_with_too_little_memory_stops_with_a_message_and_a_usable_checkpoint(tmp_path):
    from edgetune.export.exporter import ExportOptions, export_bundle
    from edgetune.runtime.batches import BatchPlan
    from edgetune.runtime.state import StateDir

    bundle = tmp_path / "b"
    export_bundle(ExportOptions(source=str(_wide_model(tmp_path / "wide")), out=bundle, quantize="none",
                                recompute="none"))
    # batch 1, examples of 16 tokens except the one that comes third in the batch order: 512 tokens
    order = BatchPlan(4, 1, seed=0).order(0)
    lengths = [16] * 4
    lengths[int(order[2])] = 600
    short = _data(tmp_path / "short.jsonl", [16] * 4)
    code, _, err, short_peak = edgetune("train", bundle, "--data", short, "--batch-size", 1, "--max-seq-len", 512,
                                        "--steps", 2, "--threads", 1, "--state-dir", tmp_path / "probe")
    assert code == 0, err
    # a cap 25 MB above what short steps need; the 512-token step needs ~80 MB more (activations)
    profile = write_profile(tmp_path, "tight", short_peak // MB + 25)
    state = tmp_path / "state"
    data = _data(tmp_path / "mixed.jsonl", lengths)
    args = ["train", bundle, "--data", data, "--batch-size", 1, "--max-seq-len", 512, "--steps", 4,
            "--save-every", 1, "--state-dir", state]
    code, _, err, _ = edgetune(*args, "--emulate", profile)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "out of memory under --emulate tight" in lines[0] and "during step 3" in lines[0], err
    assert "the checkpoint at step 2" in lines[0] and "Traceback" not in err and "onnxruntime" not in err
    kept = StateDir(state).latest()
    assert kept.trainer["step"] == 2 and set(kept.adapter())
    code, out, err, _ = edgetune(*args, "--resume")  # usable: the run continues from it without the cap
    assert code == 0 and "resuming from step 2" in err and "trained steps 2..4" in out, err


def test_the_wheel_carries_the_profiles_and_the_installed_package_finds_them(tmp_path):
    import shutil
    import zipfile

    source = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("edgetune", "devices"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "w"), str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "w").glob("edgetune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"edgetune/_devices/{n}.toml" for n in SHIPPED} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    found = subprocess.run([sys.executable, "-c", "from edgetune.devices.profile import profiles_folder, load_profiles;"
                            "print(profiles_folder(), len(load_profiles()))"], capture_output=True, text=True,
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert found.stdout.split() == [str(tmp_path / "site" / "edgetune" / "_devices"), str(len(SHIPPED))], found.stderr


SMOLLM2_CONFIG = {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "intermediate_size": 1536, "tie_word_embeddings": True}


def test_export_device_picks_the_fastest_export_that_fits_and_says_why(tmp_path):
    from edgetune.devices.export_choice import candidates, choose_export
    from edgetune.errors import ExportError
    from edgetune.methods import LoraConfig

    lora = LoraConfig()
    unsliced = {"head_slices": 0}  # the head-slice choice has its own test below
    peaks = {(c.quantize, c.recompute, c.loss_chunks): c.prediction.peak_bytes
             for c in candidates(SMOLLM2_CONFIG, lora, 8, 512, unsliced)}
    assert peaks[("int8", "full", 32)] < peaks[("int8", "cheap", 32)] < peaks[("int8", "none", 32)]
    between = (peaks[("int8", "full", 32)] + min(peaks[("int8", "cheap", 32)], peaks[("int8", "mlp", 32)])) // 2 // MB
    chosen, why = choose_export(SMOLLM2_CONFIG, lora, get_profile(str(write_profile(tmp_path, "mid", between))),
                                8, 512, unsliced)
    assert (chosen.quantize, chosen.recompute) == ("int8", "full") and "would not fit" in why
    roomy = get_profile(str(write_profile(tmp_path, "big", 60000)))
    chosen, why = choose_export(SMOLLM2_CONFIG, lora, roomy, 8, 512, {})
    assert chosen.recompute == "none" and "fastest option fits" in why
    chosen, _ = choose_export(SMOLLM2_CONFIG, lora, roomy, 8, 512, {"quantize": "none", "recompute": "cheap"})
    assert (chosen.quantize, chosen.recompute) == ("none", "cheap")
    with pytest.raises(ExportError, match="no export of this model fits tiny"):
        choose_export(SMOLLM2_CONFIG, lora, get_profile(str(write_profile(tmp_path, "tiny", 100))), 8, 512, {})


def test_export_device_slices_the_head_only_when_the_unsliced_export_does_not_fit(tmp_path):
    from edgetune.devices.export_choice import candidates, choose_export
    from edgetune.methods import LoraConfig

    lora, fixed = LoraConfig(), {"quantize": "int8", "recompute": "cheap", "loss_chunks": 8}
    peaks = {c.head_slices: c.prediction.peak_bytes for c in candidates(SMOLLM2_CONFIG, lora, 1, 128, fixed)}
    assert set(peaks) == {0, 8} and peaks[8] < peaks[0]  # one 14 MB slice instead of the 113 MB head
    tight = get_profile(str(write_profile(tmp_path, "tight", (peaks[0] + peaks[8]) // 2 // MB)))
    chosen, why = choose_export(SMOLLM2_CONFIG, lora, tight, 1, 128, fixed)
    assert chosen.head_slices == 8 and "--head-slices 8" in why
    roomy = get_profile(str(write_profile(tmp_path, "roomy", 60000)))
    assert choose_export(SMOLLM2_CONFIG, lora, roomy, 1, 128, fixed)[0].head_slices == 0  # slices cost time
    no_quant = candidates(SMOLLM2_CONFIG, lora, 1, 128, {"quantize": "none", "recompute": "cheap", "loss_chunks": 8})
    assert [c.head_slices for c in no_quant] == [0]  # an fp32 head has nothing to dequantize


def test_the_plan_from_the_model_config_matches_the_plan_from_the_exported_manifest(export_tiny, tiny_model_dir):
    from edgetune.bundle import Bundle
    from edgetune.devices.export_choice import inputs_from_config, model_config
    from edgetune.devices.plan import PlanInputs
    from edgetune.methods import LoraConfig

    manifest = Bundle.open(export_tiny(quantize="int8", recompute="full", loss_chunks=4), verify=False).manifest
    assert inputs_from_config(model_config(str(tiny_model_dir)), LoraConfig(), "int8", "full", 4) == \
        PlanInputs.from_manifest(manifest)


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])  # int4: graphs with external data
def test_ort_format_artifacts_train_like_the_onnx_ones(export_tiny, tmp_path, quantize):
    import shutil

    import numpy as np

    from edgetune.bundle import Bundle
    from edgetune.export.ort_format import write_ort_format
    folder = tmp_path / "b"
    shutil.copytree(export_tiny(quantize=quantize), folder)
    record = write_ort_format(folder)
    manifest = Bundle.open(folder).manifest  # every new file is hashed into the manifest
    expected = {"training": "training_model.ort", "eval": "eval_model.ort", "optimizer": "optimizer_model.ort"}
    if "portable_model.onnx" in manifest.files:  # the stock-onnxruntime graphs, when the bundle has them
        expected.update(portable="portable_model.ort", portable_eval="portable_eval_model.ort")
    assert manifest.producer["ort_format"]["files"] == expected == record["files"]
    assert "required_operators.config" in manifest.files
    import onnxruntime

    for role in ("portable", "portable_eval"):  # an inference session reads them with the same signature
        if role in expected:
            signatures = []
            for ext in (".onnx", ".ort"):
                session = onnxruntime.InferenceSession(str(folder / f"{role}_model{ext}"))
                signatures.append(([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]))
            assert signatures[0] == signatures[1] and "loss" in signatures[1][1]
    from onnxruntime.training import api

    from edgetune.runtime.batches import graph_inputs

    ids = np.random.default_rng(0).integers(3, 300, (2, 16)).astype(np.int64)
    feeds = graph_inputs({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids},
                         [i.name for i in manifest.inputs])  # position_ids too when the graph packs

    def losses(ext):
        state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
        module = api.Module(str(folder / f"training_model{ext}"), state, str(folder / f"eval_model{ext}"))
        optimizer = api.Optimizer(str(folder / f"optimizer_model{ext}"), module)
        module.train()
        out = []
        for _ in range(3):
            out.append(float(module(*feeds)))
            optimizer.step()
            module.lazy_reset_grad()
        return out

    np.testing.assert_allclose(losses(".ort"), losses(".onnx"), rtol=1e-6)


def test_export_for_a_phone_writes_ort_format_and_records_why(tiny_model_dir, tmp_path):
    code, out, err, _ = edgetune("export", tiny_model_dir, "--device", "android-midrange-6gb", "--out", tmp_path / "b")
    assert code == 0, err
    assert "for android-midrange-6gb: --quantize int8 --recompute none" in err and "adding --ort-format" in err
    manifest = json.loads((tmp_path / "b" / "edgetune.json").read_text())
    assert manifest["producer"]["memory"]["recompute"] == "none" and manifest["quantization"] == "int8"
    assert manifest["producer"]["ort_format"]["files"]["training"] == "training_model.ort"
