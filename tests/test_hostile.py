"""Hostile bundles and training-state folders: refused with one line and exit 2, never obeyed.

Each case builds what an attacker (or an accident) could hand a device, runs the real CLI as a
subprocess, and checks that the command refuses, and that nothing outside the bundle and state
folder was read or deleted. "Not read" is proved with named pipes: opening a FIFO for reading
blocks until a writer appears, so a command that read one would hang and hit the timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.bundle import MANIFEST, sha256_file

TIMEOUT = 120


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT)


def _refused(r, *words: str) -> None:
    """Exit 2 with exactly one `error:` line on stderr (no traceback) that contains ``words``."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


def _snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` (symlinks not followed): relative path -> (kind, bytes, mtime)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file" if path.is_file() else "other"
        data = path.read_bytes() if kind == "file" else os.readlink(path) if kind == "link" else None  # FIFOs: not opened
        out[str(path.relative_to(folder))] = (kind, data, st.st_mtime_ns)
    return out


def _edit_manifest(bundle: Path, change) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    change(data)
    (bundle / MANIFEST).write_text(json.dumps(data, indent=2))


@pytest.fixture()
def bundle(tiny_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "hi"}\n' * 8)
    return path


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A folder of the device's beside the bundle, with a FIFO that must never be opened."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's file\n")
    os.mkfifo(folder / "pipe")
    return folder


# --- state folders ------------------------------------------------------------------------------

def test_latest_pointing_outside_is_neither_loaded_nor_deleted(bundle, data, tmp_path):
    """LATEST = ../../somewhere naming a real checkpoint-shaped folder outside the state folder."""
    assert _cli("train", bundle, "--data", data, "--steps", 1, "--quiet").returncode == 0
    somewhere = tmp_path / "somewhere"
    shutil.copytree(bundle / "train-state" / "ckpt-00000001", somewhere)  # would load as a checkpoint
    (somewhere / "notes.txt").write_text("not edgetune's\n")
    before = _snapshot(somewhere)
    (bundle / "train-state" / "LATEST").write_text("../../somewhere\n")
    for args in (["train", bundle, "--data", data, "--steps", 3, "--quiet", "--resume"],
                 ["train", bundle, "--data", data, "--steps", 3, "--quiet"],
                 ["eval", bundle, "--data", data],
                 ["generate", bundle, "--prompt", "hi", "--max-new-tokens", 2],
                 ["delta", bundle, "--out", tmp_path / "u.etd"]):
        _refused(_cli(*args), "LATEST", "../../somewhere", "--restart")
        assert _snapshot(somewhere) == before
    assert not (tmp_path / "u.etd").exists()
    r = _cli("train", bundle, "--data", data, "--steps", 2, "--quiet", "--restart")  # the way out
    assert r.returncode == 0, r.stderr
    assert _snapshot(somewhere) == before
    assert (bundle / "train-state" / "LATEST").read_text().strip() == "ckpt-00000002"


def test_checkpoint_folder_symlinked_outside_is_refused(bundle, data, tmp_path):
    assert _cli("train", bundle, "--data", data, "--steps", 1, "--quiet").returncode == 0
    state = bundle / "train-state"
    elsewhere = tmp_path / "elsewhere"
    shutil.move(state / "ckpt-00000001", elsewhere)
    (state / "ckpt-00000001").symlink_to(elsewhere)
    before = _snapshot(elsewhere)
    _refused(_cli("train", bundle, "--data", data, "--steps", 3, "--quiet", "--resume"), "not an edgetune")
    assert _snapshot(elsewhere) == before


def test_latest_naming_a_missing_folder_does_not_block_restart(bundle, data):
    state = bundle / "train-state"
    assert _cli("train", bundle, "--data", data, "--steps", 1, "--quiet").returncode == 0
    shutil.rmtree(state / "ckpt-00000001")
    r = _cli("train", bundle, "--data", data, "--steps", 2, "--quiet")
    _refused(r, "ckpt-00000001", "missing", "--restart")
    _refused(_cli("train", bundle, "--data", data, "--steps", 2, "--quiet", "--resume"), "missing", "--restart")
    _refused(_cli("eval", bundle, "--data", data), "missing")
    r = _cli("train", bundle, "--data", data, "--steps", 2, "--quiet", "--restart")
    assert r.returncode == 0, r.stderr
    assert (state / "LATEST").read_text().strip() == "ckpt-00000002"


@pytest.mark.parametrize("flags", [["--restart"], ["--resume"], []], ids=["restart", "resume", "plain"])
def test_state_dir_on_a_foreign_folder_is_refused_and_kept(bundle, data, outside, flags):
    (outside / "sub").mkdir()
    (outside / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 not edgetune's")
    (outside / "LATEST").write_text("ckpt-00000001\n")  # looks a little like a state folder; still foreign
    before = _snapshot(outside)
    r = _cli("train", bundle, "--data", data, "--steps", 1, "--quiet", "--state-dir", outside, *flags)
    _refused(r, "not an edgetune training state folder", str(outside))
    assert _snapshot(outside) == before


def test_state_dir_refused_for_reading_commands_too(bundle, data, outside):
    before = _snapshot(outside)
    _refused(_cli("generate", bundle, "--prompt", "hi", "--state-dir", outside), "not an edgetune")
    _refused(_cli("eval", bundle, "--data", data, "--state-dir", outside), "not an edgetune")
    assert _snapshot(outside) == before


def test_state_dir_new_empty_and_legacy_folders_are_accepted(bundle, data, tmp_path):
    state = tmp_path / "state"
    state.mkdir()  # empty: fine
    args = ["--data", data, "--steps", 3, "--save-every", 2, "--quiet", "--state-dir", state]
    assert _cli("train", bundle, *args).returncode == 0
    assert (state / "edgetune-state.json").is_file() and (state / "LATEST").read_text().strip() == "ckpt-00000003"
    (state / "edgetune-state.json").unlink()  # a folder written before the marker existed
    r = _cli("train", bundle, *args, "--resume")
    assert r.returncode == 0 and "resuming from step 3" in r.stderr, r.stderr
    assert [json.loads(x)["step"] for x in (state / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_bundle_shipping_its_state_folder_as_a_symlink_is_refused(bundle, data, tmp_path):
    target = tmp_path / "device-folder"
    target.mkdir()
    (bundle / "train-state").symlink_to(target)
    _refused(_cli("train", bundle, "--data", data, "--steps", 1, "--quiet", "--restart"), "train-state", "symlink")
    assert list(target.iterdir()) == []


# --- bundles ------------------------------------------------------------------------------------

def test_files_entry_with_absolute_path_is_refused_before_reading(bundle, data, outside):
    _edit_manifest(bundle, lambda d: d["files"].update({"/etc/hostname": "0" * 64, str(outside / "pipe"): "0" * 64}))
    for args in (["inspect", bundle], ["train", bundle, "--data", data, "--steps", 1, "--quiet"]):
        _refused(_cli(*args), "/etc/hostname", "not a plain relative path")


@pytest.mark.parametrize("name", ["../outside/pipe", "sub/../../outside/pipe", "./tokenizer.json", "a\\b"])
def test_files_entry_escaping_the_folder_is_refused(bundle, outside, name):
    _edit_manifest(bundle, lambda d: d["files"].update({name: "0" * 64}))
    _refused(_cli("inspect", bundle), repr(name)[1:-1])


def test_files_entry_symlinked_outside_is_refused(bundle, outside):
    (bundle / "extra.bin").symlink_to(outside / "pipe")
    _edit_manifest(bundle, lambda d: d["files"].update({"extra.bin": "0" * 64}))
    _refused(_cli("inspect", bundle), "extra.bin", "outside the bundle")


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_generation_file_outside_is_refused(bundle, outside, where):
    name = str(outside / "pipe") if where == "absolute" else "../outside/pipe"
    _edit_manifest(bundle, lambda d: d["generation"].update({"file": name}))
    r = _cli("generate", bundle, "--prompt", "hi", "--max-new-tokens", 2)
    _refused(r, "generation.file", name)
    assert "protobuf" not in r.stderr.lower()


def test_generation_file_not_listed_is_refused(bundle):
    """An unlisted file in the folder is never read: naming it as the graph is refused."""
    shutil.copy(bundle / "generation_model.onnx", bundle / "other.onnx")
    _edit_manifest(bundle, lambda d: d["generation"].update({"file": "other.onnx"}))
    _refused(_cli("generate", bundle, "--prompt", "hi"), "other.onnx", "not listed")


def test_tokenizer_symlinked_outside_is_refused(bundle, data, tmp_path):
    """The symlink's target is the genuine tokenizer, so the hash matches: only containment refuses it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(bundle / "tokenizer.json", elsewhere / "tokenizer.json")
    (bundle / "tokenizer.json").symlink_to(elsewhere / "tokenizer.json")
    for args in (["generate", bundle, "--prompt", "hi"], ["train", bundle, "--data", data, "--steps", 1, "--quiet"],
                 ["inspect", bundle, "--no-verify"]):
        _refused(_cli(*args), "tokenizer.json", "outside the bundle")


def test_tokenizer_file_outside_is_refused(bundle, outside):
    _edit_manifest(bundle, lambda d: d["tokenizer"].update({"file": "../outside/pipe"}))
    _refused(_cli("generate", bundle, "--prompt", "hi"), "tokenizer.file", "../outside/pipe")


def _externalise_one_tensor(graph: Path, location: str, data_file: Path) -> None:
    """Move the largest initializer of ``graph`` into ``data_file``, recorded as ``location``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data) or numpy_helper.to_array(t).nbytes)
    raw = numpy_helper.to_array(tensor).tobytes()
    data_file.write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(graph))


@pytest.mark.parametrize("case", ["parent", "absolute", "symlink", "unlisted"])
def test_external_data_outside_or_unlisted_is_refused(bundle, tmp_path, case):
    graph = bundle / "generation_model.onnx"
    inside = bundle / "weights.bin"
    if case == "parent":
        location, data_file = "../weights.bin", tmp_path / "weights.bin"
    elif case == "absolute":
        location, data_file = str(tmp_path / "weights.bin"), tmp_path / "weights.bin"
    elif case == "symlink":
        location, data_file = "weights.bin", tmp_path / "weights.bin"
        inside.symlink_to(data_file)
    else:
        location, data_file = "weights.bin", inside
    _externalise_one_tensor(graph, location, data_file)
    listed = {"generation_model.onnx": sha256_file(graph)}
    if case == "symlink":
        listed["weights.bin"] = sha256_file(data_file)  # listed and hash-correct, but outside
    _edit_manifest(bundle, lambda d: d["files"].update(listed))
    before = data_file.stat().st_mtime_ns
    r = _cli("generate", bundle, "--prompt", "hi", "--max-new-tokens", 2)
    if case == "symlink":  # caught already as a listed file resolving outside
        _refused(r, "weights.bin", "outside the bundle")
    else:
        _refused(r, "generation_model.onnx", "external data")
    assert data_file.stat().st_mtime_ns == before


def test_external_data_inside_and_listed_is_accepted(bundle):
    """The same rewrite with the data file listed: the bundle opens and generates."""
    graph = bundle / "generation_model.onnx"
    _externalise_one_tensor(graph, "weights.bin", bundle / "weights.bin")
    _edit_manifest(bundle, lambda d: d["files"].update({"generation_model.onnx": sha256_file(graph),
                                                         "weights.bin": sha256_file(bundle / "weights.bin")}))
    r = _cli("generate", bundle, "--prompt", "hi", "--max-new-tokens", 2)
    assert r.returncode == 0, r.stderr


def test_unlisted_files_in_the_bundle_are_never_read(bundle, data):
    os.mkfifo(bundle / "stray.onnx")  # would block any command that opened it
    r = _cli("train", bundle, "--data", data, "--steps", 1, "--quiet")
    assert r.returncode == 0, r.stderr
    assert _cli("inspect", bundle).returncode == 0


def test_train_with_eval_hashes_each_bundle_file_once(bundle, data, monkeypatch):
    """One command, one verification: train with --eval-data evaluates twice but hashes once."""
    import edgetune.bundle as bundle_module
    from edgetune.cli import main

    real, hashed = bundle_module.sha256_file, []
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: hashed.append(Path(path)) or real(path))
    main(["train", str(bundle), "--data", str(data), "--eval-data", str(data), "--steps", "1", "--quiet"])
    listed = json.loads((bundle / MANIFEST).read_text())["files"]
    assert sorted(p.name for p in hashed if p.parent == bundle) == sorted(listed)  # the data file is hashed too


def test_unlisted_checkpoint_sidecar_is_refused(bundle):
    """ONNX Runtime would read "checkpoint.data" beside the checkpoint by its name alone."""
    (bundle / "checkpoint.data").write_bytes(b"\0" * 16)
    _refused(_cli("inspect", bundle), "checkpoint.data", "not listed")


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00garbage", b"ckpt-00000001/../../x", b"/etc", b""])
def test_latest_that_is_not_a_checkpoint_name_is_refused(bundle, data, pointer):
    state = bundle / "train-state"
    state.mkdir()
    (state / "LATEST").write_bytes(pointer)
    _refused(_cli("eval", bundle, "--data", data), "LATEST", "--restart")
