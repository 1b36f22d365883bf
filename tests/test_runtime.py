"""Device runtime: trains, masks prompts, resumes after kill -9, refuses bad input, stays torch-free."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest

HEAVY = ("torch", "transformers", "peft", "optimum")
PAIRS = [
    ("What is the colour of the sky?", "blue"),
    ("Name a fruit.", "apple"),
    ("Say hello.", "hello there"),
    ("Count to three.", "one two three"),
]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _write_pairs(path: Path, repeat: int = 4) -> Path:
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS * repeat))
    return path


@pytest.fixture()
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy, so training state written by one test is not seen by another."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_runtime_imports_no_torch(bundle, tmp_path):
    """With torch installed, importing and using the device half still loads none of the heavy packages."""
    data = _write_pairs(tmp_path / "pairs.jsonl")
    code = ("import sys, edgetune.runtime.trainer, edgetune.runtime.evaluate, edgetune.runtime.answer, "
            "edgetune.runtime.import_adapter, edgetune.delta, edgetune.peft_io, edgetune.merge, edgetune.federated\n"
            "from edgetune.cli import main\n"
            f"for args in (['train', {str(bundle)!r}, '--data', {str(data)!r}, '--steps', '1', '--quiet'], "
            f"['generate', {str(bundle)!r}, '--prompt', 'hi', '--max-new-tokens', '2']):\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert not e.code, e.code\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.splitlines()[-1] == "[]"


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_loss_falls_on_memorisable_data(export_tiny, tmp_path):
    """LoRA on every linear layer: a random tiny model has too little in q/v alone to memorise."""
    import shutil

    from edgetune.runtime.trainer import TrainOptions, train

    bundle = tmp_path / "bundle"
    shutil.copytree(export_tiny(quantize="none", targets=ALL_LINEAR), bundle)
    data = _write_pairs(tmp_path / "pairs.jsonl")
    result = train(Bundle.open(bundle), TrainOptions(data=data, steps=30, batch_size=4, lr=1e-2, save_every=100), progress=False)
    assert len(result.losses) == 30
    start, end = np.mean(result.losses[:3]), np.mean(result.losses[-3:])
    assert end < 0.4 * start, (start, end)
    lines = (bundle / "train-state" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 31))
    # eval: on the training data the trained adapter beats the base model
    r = _cli("eval", bundle, "--data", data, "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["with_adapter"]["loss"] < ev["without_adapter"]["loss"]
    assert ev["adapter"] == "trained, step 30"


def test_resume_after_kill_matches_uninterrupted_run(bundle, tmp_path):
    import shutil

    from safetensors.numpy import load_file

    data = _write_pairs(tmp_path / "pairs.jsonl", repeat=6)
    args = ["--data", data, "--steps", 24, "--batch-size", 2, "--lr", 5e-3, "--warmup", 3, "--save-every", 4, "--quiet"]
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    assert _cli("train", other, *args).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "train", str(bundle), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = bundle / "train-state" / "LATEST"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and int(latest.read_text().strip().split("-")[1]) >= 8:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 8 <= killed_at < 24
    r = _cli("train", bundle, *args)
    assert r.returncode == 2 and "--resume" in r.stderr  # refuses to silently start over
    r = _cli("train", bundle, *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {killed_at}" in r.stderr
    final = load_file(str(bundle / "train-state" / "ckpt-00000024" / "adapter.safetensors"))
    reference = load_file(str(other / "train-state" / "ckpt-00000024" / "adapter.safetensors"))
    assert final.keys() == reference.keys()
    for key in final:
        np.testing.assert_allclose(final[key], reference[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (bundle / "train-state" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))


def test_kill_before_first_checkpoint_then_resume_writes_each_step_once(bundle, tmp_path):
    """Killed after metrics lines but before any checkpoint: --resume starts at step 0 and the
    metrics file ends equal to an uninterrupted run's (steps, losses, learning rates, tokens)."""
    import shutil

    data = _write_pairs(tmp_path / "pairs.jsonl", repeat=6)
    args = ["--data", data, "--steps", 60, "--batch-size", 2, "--lr", 5e-3, "--warmup", 3, "--save-every", 1000,
            "--quiet"]
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    assert _cli("train", other, *args).returncode == 0

    state = bundle / "train-state"
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "train", str(bundle), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (state / "metrics.jsonl").exists() and (state / "metrics.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (state / "LATEST").exists() and (state / "metrics.jsonl").read_text().count("\n") >= 2
    r = _cli("train", bundle, *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "no earlier run to resume" in r.stderr

    def rows(folder):
        lines = (folder / "train-state" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    got, want = rows(bundle), rows(other)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, 61))
    for g, w in zip(got, want):
        assert (g["lr"], g["tokens"]) == (w["lr"], w["tokens"])
        assert abs(g["loss"] - w["loss"]) <= 1e-5 * max(abs(w["loss"]), 1.0), (g, w)


def test_nan_loss_stops_and_keeps_checkpoint(bundle, tmp_path):
    from edgetune.errors import TrainingError
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.import_adapter import import_adapter
    from edgetune.runtime.trainer import TrainOptions, train

    huge = {k: np.full_like(v, 3e38) for k, v in initial_adapter(Bundle.open(bundle)).items()}
    ckpt = import_adapter(Bundle.open(bundle), huge, "test: overflowing adapter")
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step 1; .*checkpoint at step 0"):
        train(Bundle.open(bundle), TrainOptions(data=_write_pairs(tmp_path / "d.jsonl"), steps=3), progress=False)
    assert ckpt.exists() and (bundle / "train-state" / "LATEST").read_text().strip() == ckpt.name


def test_disk_full_while_checkpointing_keeps_previous(bundle, tmp_path, monkeypatch):
    import errno

    from edgetune.errors import TrainingError
    from edgetune.runtime import ort_backend
    from edgetune.runtime.state import StateDir
    from edgetune.runtime.trainer import TrainOptions, train

    real_save, calls = ort_backend.OrtTrainingBackend.save, []

    def failing_save(self, path):
        calls.append(path)
        if len(calls) == 2:
            real_save(self, path)  # half a file on disk, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(self, path)

    monkeypatch.setattr(ort_backend.OrtTrainingBackend, "save", failing_save)
    with pytest.raises(TrainingError, match="disk is full .* step 4 .*checkpoint at step 2 is intact"):
        train(Bundle.open(bundle), TrainOptions(data=_write_pairs(tmp_path / "d.jsonl"), steps=6, save_every=2), progress=False)
    latest = StateDir(bundle / "train-state").latest()
    assert latest.trainer["step"] == 2 and set(latest.adapter()) == {t.graph_name for t in read_manifest(bundle).trainable}
    assert not list((bundle / "train-state").glob(".*partial"))


@pytest.mark.parametrize("content, expected", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', "line 2"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "line 2"),
    ("", "empty"),
])
def test_bad_data_names_file_and_line(bundle, tmp_path, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    r = _cli("train", bundle, "--data", data, "--steps", 1)
    assert r.returncode == 2 and expected in r.stderr and "bad.jsonl" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    if "line 2" in expected:
        r = _cli("train", bundle, "--data", data, "--steps", 1, "--skip-bad", "--quiet")
        assert r.returncode == 0, r.stderr
        assert "1 bad lines skipped" in r.stdout


def test_generate_prints_answer_only(bundle, tmp_path):
    r = _cli("generate", bundle, "--prompt", "Say hello.", "--max-new-tokens", 5)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) <= 1 and "[adapter: bundle's initial adapter]" in r.stderr
    assert _cli("generate", bundle, "--prompt", "x", "--max-new-tokens", 0).returncode == 2


def test_incomplete_bundle_refused_by_train(bundle, tmp_path):
    (bundle / "optimizer_model.onnx").unlink()
    r = _cli("train", bundle, "--data", _write_pairs(tmp_path / "d.jsonl"), "--steps", 1)
    assert r.returncode == 2 and "incomplete: missing optimizer_model.onnx" in r.stderr


# sys.modules[name] = None is what "not installed" looks like to both `import` and find_spec.
BLOCK_HEAVY = f"""
import sys
for name in {HEAVY!r}:
    sys.modules[name] = None
from edgetune.cli import main
main(sys.argv[1:])
"""


def test_device_commands_work_with_torch_uninstalled(bundle, tmp_path):
    """As on a device: torch, transformers, peft and optimum cannot be imported at all."""
    def run(*args):
        return subprocess.run([sys.executable, "-c", BLOCK_HEAVY, *map(str, args)], capture_output=True, text=True, timeout=300)

    data = _write_pairs(tmp_path / "pairs.jsonl")
    for args in (["train", bundle, "--data", data, "--steps", 2, "--quiet"], ["eval", bundle, "--data", data],
                 ["generate", bundle, "--prompt", "Say hello.", "--max-new-tokens", 4],
                 ["delta", bundle, "--out", tmp_path / "u.etd", "--codec", "int8"], ["delta", "inspect", tmp_path / "u.etd"],
                 ["to-peft", tmp_path / "u.etd", "--bundle", bundle, "--out", tmp_path / "peft"]):
        r = run(*args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
    assert run("inspect", bundle).returncode == 0
