"""``Bundle.open(verify=roles)``: a command hashes only the files it reads and refuses to hand out the others.

``generate`` reads the generation graph, the tokenizer and (with nothing trained) the checkpoint; a
changed training graph must not stop it, a changed file it reads must. The hostile-bundle rules
(containment, listing, external data) are in tests/test_hostile.py and hold for both ways of opening.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.bundle import GENERATE_ROLES, MANIFEST, Bundle, sha256_file
from edgetune.errors import BundleError


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _tamper(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")  # one byte more: the manifest's SHA-256 no longer matches


@pytest.fixture()
def bundle(tiny_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_generate_hashes_only_what_it_reads(bundle, monkeypatch, capsys):
    import edgetune.bundle as bundle_module
    from edgetune.cli import main

    real, hashed = bundle_module.sha256_file, []
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: hashed.append(Path(path)) or real(path))
    main(["generate", str(bundle), "--prompt", "hi", "--max-new-tokens", "2", "--no-adapter"])
    names = sorted(p.name for p in hashed if p.parent == bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    expected = sorted({manifest["generation"]["file"], manifest["tokenizer"]["file"], "checkpoint"})
    assert names == expected  # each once; the training, eval, optimizer and portable graphs never
    assert set(manifest["files"]) - set(names)  # there were files it did not need


@pytest.mark.parametrize("name", ["training_model.onnx", "optimizer_model.onnx", "eval_model.onnx"])
def test_a_changed_file_generate_does_not_read_does_not_stop_it(bundle, name):
    assert name in json.loads((bundle / MANIFEST).read_text())["files"]
    _tamper(bundle / name)
    r = _cli("generate", bundle, "--prompt", "hi", "--max-new-tokens", 2)
    assert r.returncode == 0, r.stderr
    refused = _cli("inspect", bundle)  # a command that reads everything still refuses the bundle
    assert refused.returncode == 2 and name in refused.stderr


@pytest.mark.parametrize("role", ["generation", "tokenizer", "checkpoint"])
def test_a_changed_file_generate_reads_is_refused(bundle, role):
    name = Bundle.open(bundle, verify=False).file_name(role)
    _tamper(bundle / name)
    r = _cli("generate", bundle, "--prompt", "hi", "--max-new-tokens", 2)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("error: ") and name in lines[0] and "SHA-256" in lines[0]


def test_the_cached_session_is_not_trusted_over_a_changed_graph(bundle):
    """The first run writes the optimised-graph cache; a changed graph afterwards is still refused."""
    assert _cli("generate", bundle, "--prompt", "hi", "--max-new-tokens", 2).returncode == 0
    assert (bundle / "generation-cache").is_dir()
    _tamper(bundle / "generation_model.onnx")
    r = _cli("generate", bundle, "--prompt", "hi", "--max-new-tokens", 2)
    assert r.returncode == 2 and "generation_model.onnx" in r.stderr


def test_roles_outside_verify_are_never_handed_out(bundle):
    opened = Bundle.open(bundle, verify=GENERATE_ROLES)
    for role in ("training", "eval", "optimizer"):
        with pytest.raises(ValueError, match="unverified"):
            opened.path(role)
    assert opened.path("generation").name == "generation_model.onnx"
    with pytest.raises(ValueError, match="unknown bundle file role"):
        Bundle.open(bundle, verify=("generation", "weights"))


def test_external_data_of_a_verified_graph_is_hashed_too(bundle):
    """A graph moved partly into a listed data file: changing that file is refused like the graph."""
    from tests.test_hostile import _externalise_one_tensor

    graph = bundle / "generation_model.onnx"
    _externalise_one_tensor(graph, "weights.bin", bundle / "weights.bin")
    data = json.loads((bundle / MANIFEST).read_text())
    data["files"].update({"generation_model.onnx": sha256_file(graph), "weights.bin": sha256_file(bundle / "weights.bin")})
    (bundle / MANIFEST).write_text(json.dumps(data, indent=2))
    Bundle.open(bundle, verify=GENERATE_ROLES).path("generation")  # consistent: accepted
    _tamper(bundle / "weights.bin")
    with pytest.raises(BundleError, match="weights.bin"):
        Bundle.open(bundle, verify=GENERATE_ROLES).path("generation")


def test_a_graph_with_external_data_outside_is_refused_even_with_a_cache(bundle, tmp_path):
    """A bundle shipping a cache vouched for by a forged JSON beside a generation graph whose data
    lies outside (a FIFO: reading it would hang) is refused, cached start or not: the graph's
    external data is checked at every start, and nothing outside is opened."""
    import os

    from tests.test_hostile import _externalise_one_tensor

    assert _cli("generate", bundle, "--prompt", "hi", "--max-new-tokens", 2).returncode == 0  # writes the cache
    graph = bundle / "generation_model.onnx"
    old = sha256_file(graph)
    _externalise_one_tensor(graph, "../outside.bin", tmp_path / "outside.bin")
    (tmp_path / "outside.bin").unlink()
    os.mkfifo(tmp_path / "outside.bin")
    data = json.loads((bundle / MANIFEST).read_text())
    data["files"]["generation_model.onnx"] = sha256_file(graph)
    (bundle / MANIFEST).write_text(json.dumps(data, indent=2))
    meta = bundle / "generation-cache" / "generation-exact.json"
    meta.write_text(meta.read_text().replace(old, data["files"]["generation_model.onnx"]))
    for _ in range(2):  # with the forged cache, then without it
        r = _cli("generate", bundle, "--prompt", "hi", "--max-new-tokens", 2)
        assert r.returncode == 2 and "external data" in r.stderr, r.stderr
        meta.unlink(missing_ok=True)
