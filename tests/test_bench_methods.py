"""bench/methods.py end to end on tiny bundles: every row measured, and each row's PyTorch
reference counts the same trainable parameters and starts from the same loss as edgetune."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("adapters")

# method name in bench/methods.py -> tiny export options (fp32 base, so edgetune's first loss is the
# reference's: LoRA B, the adapter's up-projection and a full delta all start at zero)
TINY = {
    "lora": {"quantize": "none"},
    "adapter": {"method": "adapter", "dim": 4, "where": ("mlp", "attn"), "quantize": "none"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 4, "quantize": "none"},
    "full": {"method": "full", "quantize": "none"},
}
SAME_START = ("lora", "adapter", "full")  # prefix: edgetune starts from real tokens' keys/values, PEFT from noise


def test_every_method_row_is_measured_against_its_reference(export_tiny, tiny_model_dir, tmp_path, capsys):
    from bench import methods

    bundles = tmp_path / "bundles"
    bundles.mkdir()
    for name, options in TINY.items():
        (bundles / name).symlink_to(export_tiny(**options))
    out = tmp_path / "methods.json"
    methods.main(["--bundles", str(bundles), "--model", str(tiny_model_dir), "--only", ",".join(TINY),
                  "--threads", "1", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "1",
                  "--json-out", str(out)])
    result = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert list(result["methods"]) == list(TINY)
    for name, row in result["methods"].items():
        t = row["trainers"]
        assert set(t) == {"edgetune", "edgetune_portable", "pytorch"}, name
        assert row["trainable_parameters"] == t["pytorch"]["trainable_parameters"], name
        assert t["edgetune"]["torch_imported"] is False
        losses = {who: x["losses"][0] for who, x in t.items()}
        assert losses["edgetune_portable"] == pytest.approx(losses["edgetune"], rel=1e-4), name
        if name in SAME_START:
            assert losses["pytorch"] == pytest.approx(losses["edgetune"], rel=1e-4), name
        assert 0 < row["delta_file_bytes"]["int8"] and 0 < row["delta_file_bytes"]["fp16"] < row["delta_file_bytes"]["fp32"]
        assert row["export"] is None  # reused, not exported
        assert f"| {name} |" in table
    full = result["methods"]["full"]
    assert full["trainable_parameters"] == full["base_parameters"]
    assert "SIMD:" in table


def test_a_bundle_of_another_method_is_refused_and_the_others_measured(export_tiny, tiny_model_dir, tmp_path):
    from bench import methods

    (tmp_path / "full").symlink_to(export_tiny(quantize="none"))  # a LoRA bundle where full's belongs
    (tmp_path / "lora").symlink_to(export_tiny(quantize="none"))
    out = tmp_path / "m.json"
    with pytest.raises(SystemExit, match="failed: full"):
        methods.main(["--bundles", str(tmp_path), "--model", str(tiny_model_dir), "--only", "full,lora",
                      "--skip-torch", "--skip-portable", "--steps", "1", "--threads", "1", "--json-out", str(out)])
    result = json.loads(out.read_text())
    assert "holds a lora bundle, not full" in result["failed"]["full"]
    assert list(result["methods"]) == ["lora"]  # measured all the same
