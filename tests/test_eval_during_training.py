"""train --eval-data --eval-every: metrics in metrics.jsonl, the best adapter kept beside the latest,
--early-stop, --checkpoint best for eval/generate/delta, and resume after kill -9 with evaluations."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_runtime import _cli, _write_pairs

HELD = [("Name a colour.", "red"), ("Say goodbye.", "goodbye"), ("What is two plus two?", "four")]


@pytest.fixture()
def bundle(export_tiny, tmp_path) -> Path:
    """LoRA on every linear layer (the tiny model learns visibly), a private copy per test."""
    source = export_tiny(quantize="none", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"))
    copy = tmp_path / "bundle"
    shutil.copytree(source, copy)
    return copy


def _held(path: Path) -> Path:
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in HELD))
    return path


def _rows(bundle: Path) -> list[dict]:
    return [json.loads(x) for x in (bundle / "train-state" / "metrics.jsonl").read_text().splitlines()]


def test_eval_every_keeps_best_by_eval_loss(bundle, tmp_path):
    from safetensors.numpy import load_file

    from edgetune.bundle import Bundle
    from edgetune.runtime.evaluate import evaluate

    data, held = _write_pairs(tmp_path / "pairs.jsonl", repeat=4), _held(tmp_path / "held.jsonl")
    r = _cli("train", bundle, "--data", data, "--steps", 12, "--batch-size", 2, "--lr", 2e-2, "--save-every", 5,
             "--eval-data", held, "--eval-every", 3, "--quiet")
    assert r.returncode == 0, r.stderr
    evals = [row for row in _rows(bundle) if "eval" in row]
    assert [e["step"] for e in evals] == [3, 6, 9, 12]
    losses = [e["eval"]["loss"] for e in evals]
    best_step = evals[int(np.argmin(losses))]["step"]
    assert [e["best"] for e in evals] == [l < min(losses[:i], default=np.inf) for i, l in enumerate(losses)]
    state = bundle / "train-state"
    assert (state / "BEST").read_text().strip() == f"best-{best_step:08d}"
    assert sorted(p.name for p in state.glob("best-*")) == [f"best-{best_step:08d}"]  # older bests pruned
    assert f"best: step {best_step}" in r.stdout

    # The kept adapter is the one that scored that loss: evaluating it again gives the same number.
    opened = Bundle.open(bundle)
    again = evaluate(opened, held, batch_size=2, checkpoint="best")
    assert again["with_adapter"]["loss"] == pytest.approx(min(losses), rel=1e-5)
    assert again["adapter"] == f"trained, step {best_step} (best eval loss)"

    # delta --checkpoint best ships the best adapter; latest ships the step-12 one.
    for which in ("best", "latest"):
        r = _cli("delta", bundle, "--out", tmp_path / f"{which}.etd", "--codec", "fp32", "--checkpoint", which)
        assert r.returncode == 0, r.stderr
        r = _cli("to-peft", tmp_path / f"{which}.etd", "--bundle", bundle, "--out", tmp_path / f"peft-{which}")
        assert r.returncode == 0, r.stderr
    folder = state / f"best-{best_step:08d}" if best_step != 12 else None
    if folder is not None:
        best = load_file(str(folder / "adapter.safetensors"))
        peft_best = load_file(str(tmp_path / "peft-best" / "adapter_model.safetensors"))
        peft_latest = load_file(str(tmp_path / "peft-latest" / "adapter_model.safetensors"))
        assert sorted(np.concatenate([v.ravel() for v in best.values()])) == \
            pytest.approx(sorted(np.concatenate([v.ravel() for v in peft_best.values()])))
        assert any(not np.array_equal(peft_best[k], peft_latest[k]) for k in peft_best)
    r = _cli("generate", bundle, "--prompt", "Name a fruit.", "--max-new-tokens", 3, "--checkpoint", "best")
    assert r.returncode == 0 and f"step {best_step}" in r.stderr, r.stderr


def test_checkpoint_best_without_a_best_is_refused(bundle, tmp_path):
    r = _cli("generate", bundle, "--prompt", "hi", "--checkpoint", "best")
    assert r.returncode == 2 and "--eval-every" in r.stderr and "Traceback" not in r.stderr


def test_early_stop_after_k_evaluations_without_improvement(bundle, tmp_path):
    """A full run's evaluations say where --early-stop 2 must stop; a second run stops exactly there."""
    data, held = _write_pairs(tmp_path / "pairs.jsonl", repeat=4), _held(tmp_path / "held.jsonl")
    args = ["--data", data, "--steps", 24, "--batch-size", 2, "--lr", 5e-2, "--eval-data", held, "--eval-every", 2,
            "--quiet"]
    full = tmp_path / "full"
    shutil.copytree(bundle, full)
    assert _cli("train", full, *args).returncode == 0
    best, bad, expected = np.inf, 0, None
    for row in (row for row in _rows(full) if "eval" in row):
        best, bad = (row["eval"]["loss"], 0) if row["eval"]["loss"] < best else (best, bad + 1)
        if bad == 2:
            expected = row["step"]
            break
    assert expected is not None, "the held-out loss never stalled twice; make the run overfit more"

    r = _cli("train", bundle, *args, "--early-stop", 2)
    assert r.returncode == 0, r.stderr
    assert f"stopping early at step {expected}" in r.stderr and "(stopped early; 24 planned)" in r.stdout
    assert [x["step"] for x in _rows(bundle) if "eval" in x] == list(range(2, expected + 1, 2))
    assert (bundle / "train-state" / "LATEST").read_text().strip() == f"ckpt-{expected:08d}"
    r = _cli("train", bundle, *args, "--early-stop", 2, "--resume")  # a stopped run stays stopped
    assert r.returncode == 0 and f"stopped early at step {expected}" in r.stderr, r.stderr


@pytest.mark.parametrize("bad, message", [(["--eval-every", 2], "--eval-data"), (["--early-stop", 0, "--eval-data", "H"], "--early-stop")])
def test_bad_eval_options_refused(bundle, tmp_path, bad, message):
    data, held = _write_pairs(tmp_path / "pairs.jsonl"), _held(tmp_path / "held.jsonl")
    bad = [str(held) if x == "H" else x for x in bad]
    r = _cli("train", bundle, "--data", data, "--steps", 2, *bad)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_resume_after_kill_with_evaluations_matches_uninterrupted_run(bundle, tmp_path):
    """Killed between checkpoints (after evaluations wrote best folders): the resumed run ends with the
    same latest adapter, the same BEST and the same metrics lines as an uninterrupted one."""
    from safetensors.numpy import load_file

    data, held = _write_pairs(tmp_path / "pairs.jsonl", repeat=6), _held(tmp_path / "held.jsonl")
    args = ["--data", data, "--steps", 30, "--batch-size", 2, "--lr", 2e-2, "--warmup", 2, "--save-every", 7,
            "--eval-data", held, "--eval-every", 3, "--quiet"]
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    assert _cli("train", other, *args).returncode == 0

    state = bundle / "train-state"
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "train", str(bundle), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill after an evaluation past a checkpoint
        if (state / "LATEST").exists() and (state / "metrics.jsonl").exists():
            rows = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]
            if any("eval" in row and row["step"] in (9, 12, 15, 18) for row in rows):
                break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = _cli("train", bundle, *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from step" in r.stderr

    def summary(b: Path):
        s = b / "train-state"
        best = (s / "BEST").read_text().strip()
        return best, load_file(str(s / best / "adapter.safetensors")), load_file(str(s / "ckpt-00000030" / "adapter.safetensors"))

    got, want = summary(bundle), summary(other)
    assert got[0] == want[0]
    assert sorted(p.name for p in state.glob("best-*")) == [got[0]]
    for g, w in ((got[1], want[1]), (got[2], want[2])):
        assert g.keys() == w.keys()
        for key in g:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6)
    rg, rw = _rows(bundle), _rows(other)
    assert [(r["step"], "eval" in r) for r in rg] == [(r["step"], "eval" in r) for r in rw]
    for a, b in zip(rg, rw):
        if "eval" in a:
            assert a["best"] == b["best"] and a["eval"]["loss"] == pytest.approx(b["eval"]["loss"], rel=1e-5)


@pytest.mark.parametrize("content, expected", [("ckpt-00000004\n", "not a checkpoint folder (best-NNNNNNNN)"),
                                               ("../../etc\n", "not a checkpoint folder"),
                                               ("best-00000009\n", "which is missing")])
def test_damaged_best_pointer_is_refused(tmp_path, content, expected):
    from edgetune.errors import TrainingError
    from edgetune.runtime.state import StateDir

    state = StateDir(tmp_path / "state")
    state.save_best({"step": 4}, {"x": np.zeros(2, np.float32)})
    assert state.best().trainer["step"] == 4
    (tmp_path / "state" / "BEST").write_text(content)
    with pytest.raises(TrainingError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        state.best()


def test_rewind_best_after_a_kill(tmp_path):
    """Bests written after the resumed checkpoint go; BEST returns to the one that checkpoint recorded."""
    from edgetune.runtime.state import StateDir

    state = StateDir(tmp_path / "state")
    for step in (3, 6, 9):
        state.save_best({"step": step}, {"x": np.full(2, step, np.float32)})
    state.prune_best(6)  # a checkpoint at step 7 recorded best 6
    assert sorted(p.name for p in (tmp_path / "state").glob("best-*")) == ["best-00000006", "best-00000009"]
    state.rewind_best(7, 6)  # killed after the eval at 9, resumed from 7
    assert state.best().trainer["step"] == 6
    assert sorted(p.name for p in (tmp_path / "state").glob("best-*")) == ["best-00000006"]
    state.rewind_best(0, None)
    assert state.best() is None and not list((tmp_path / "state").glob("best-*"))
