"""`edgetune collect` commands: store set-up, devices, status, export to PEFT, one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.collector_helpers import ROOT, cli, make_store


def test_federated_imports_without_heavy_packages_or_the_collect_extra():
    """edgetune.federated loads with torch & co. absent and with starlette/uvicorn not installed."""
    blocked = ("torch", "transformers", "peft", "optimum", "starlette", "uvicorn", "fastapi")
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None  # an import of any of them now fails\n"
            "import edgetune.federated.admission, edgetune.federated.aggregate, edgetune.federated.privacy\n"
            "import edgetune.federated.store, edgetune.federated.collector, edgetune.federated.server\n"
            "import edgetune.federated.status, edgetune.federated.page, edgetune.federated.bundle_io\n"
            "import edgetune.commands.collect_cmds\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_init_devices_status_export(tiny_bundle, tiny_model_dir, tmp_path):
    from edgetune.delta import generate_keypair

    store = tmp_path / "fleet"
    tokens = make_store(tiny_bundle, store, ["phone-1"])
    assert len(tokens["phone-1"]) >= 40
    assert tokens["phone-1"] not in (store / "collector.sqlite").read_bytes().decode("latin-1")  # only its hash
    generate_keypair(tmp_path / "d.key")
    r = cli("collect", "devices", "add", "phone-2", "--store", store, "--public-key", tmp_path / "d.key.pub")
    assert r.returncode == 0 and "key" in r.stdout
    from edgetune.federated.store import Store

    s = Store(store)  # durable settings: WAL, and every commit fsynced (synchronous=FULL is 2)
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.db.execute("PRAGMA synchronous").fetchone()[0] == 2
    s.close()
    r = cli("collect", "status", "--store", store)
    assert r.returncode == 0 and "devices    2" in r.stdout and "round      0 open" in r.stdout
    status = json.loads(cli("collect", "status", "--store", store, "--json").stdout)
    assert status["current_round"] == 0 and status["space"] == "lora-product" and status["accepted_total"] == 0
    # export round 0 as PEFT: PeftModel loads it, and its LoRA weights are the bundle's initial adapter
    out = tmp_path / "global-adapter"
    r = cli("collect", "export", "--store", store, "--round", "latest", "--peft", out, "--bundle", tiny_bundle)
    assert r.returncode == 0, r.stderr
    r = cli("collect", "export", "--store", store, "--round", "0", "--delta", tmp_path / "g0.etd")
    assert r.returncode == 0, r.stderr
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.delta import read_delta

    glob = read_delta(tmp_path / "g0.etd")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(state) == set(glob.tensors)
    for k, v in glob.tensors.items():
        torch.testing.assert_close(state[k], torch.from_numpy(v))
    assert np.abs(glob.tensors[next(k for k in glob.tensors if ".lora_A." in k)]).sum() > 0  # A's seeded init


def test_one_line_errors(tiny_bundle, tmp_path):
    store = tmp_path / "fleet"
    make_store(tiny_bundle, store, ["a"])
    cases = [
        (("collect", "init", "--bundle", tiny_bundle, "--store", store), "already holds a collector store"),
        (("collect", "init", "--bundle", tmp_path / "nope", "--store", tmp_path / "s2"), "not a folder"),
        (("collect", "devices", "add", "a", "--store", store), "already registered"),
        (("collect", "devices", "add", "bad id!", "--store", store), "device id"),
        (("collect", "devices", "add", "b", "--store", store, "--public-key", tmp_path / "none.pub"), "cannot read"),
        (("collect", "status", "--store", tmp_path / "empty"), "not a collector store"),
        (("collect", "export", "--store", store, "--round", "5", "--delta", tmp_path / "x.etd"), "--round"),
        (("collect", "export", "--store", store, "--peft", tmp_path / "p"), "--peft needs --bundle"),
        (("collect", "serve", "--store", store, "--dp-clip", "1"), "--dp-noise-multiplier"),
        (("collect", "serve", "--store", store, "--min-updates", "0"), "--min-updates"),
        (("collect", "serve", "--store", store, "--aggregator", "median", "--trim", "0.7"), "--trim"),
        (("collect", "serve", "--store", store, "--max-norm", "-1"), "--max-norm"),
    ]
    for args, fragment in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)


def test_serve_refuses_a_busy_port_and_a_served_store(tiny_bundle, tmp_path):
    from tests.collector_helpers import Server, free_port

    store = tmp_path / "fleet"
    make_store(tiny_bundle, store, [])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = cli("collect", "serve", "--store", store, "--port", busy.getsockname()[1], timeout=60)
    assert r.returncode == 2 and "cannot listen" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with Server(store):
        r = cli("collect", "serve", "--store", store, "--port", free_port(), timeout=60)
    assert r.returncode == 2 and "already being served" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_collect_command_has_help(flag):
    for args in (("collect",), ("collect", "init"), ("collect", "devices"), ("collect", "devices", "add"),
                 ("collect", "serve"), ("collect", "status"), ("collect", "export")):
        r = cli(*args, flag)
        assert r.returncode == 0 and "Usage:" in r.stdout, args


def test_frozen_a_bundle_ships_b_only_and_exports_a_from_the_bundle(export_tiny, tiny_bundle, tiny_model_dir, tmp_path):
    """An `export --freeze-a` bundle (FFA-LoRA): the store's layout is B only, and the PEFT export takes A
    from the bundle (its seeded init, the same as a plain export's initial A)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.federated.bundle_io import global_tensors
    from edgetune.federated.store import Store
    from edgetune.bundle import Bundle
    from edgetune.runtime.adapter_source import initial_adapter

    bundle = export_tiny(quantize="none", freeze_a=True)
    store = tmp_path / "fleet"
    make_store(bundle, store, [])
    s = Store(store)
    assert s.meta("space") == "tensor" and all(".lora_B." in k for k in s.meta("layout"))
    out = tmp_path / "peft"
    r = cli("collect", "export", "--store", store, "--peft", out, "--bundle", bundle)
    assert r.returncode == 0, r.stderr
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    original = Bundle.open(tiny_bundle)
    init = initial_adapter(original)
    for t in original.manifest.trainable:
        expected = global_tensors(s, 0)[t.peft_key] if ".lora_B." in t.peft_key else init[t.graph_name]
        torch.testing.assert_close(state[t.peft_key], torch.from_numpy(expected))
