"""``edgetune delta inspect``: what a delta holds, in words and as a dict."""

from __future__ import annotations

from pathlib import Path

from edgetune.summary import human_bytes


def describe(delta, path: Path | str) -> dict:
    h = delta.header
    payload = sum(delta.payload_sizes.values())
    params = sum(int(x.size) for x in delta.tensors.values())
    worst = max((t["error"]["rel_l2"] for t in h["tensors"]), default=0.0)
    worst_abs = max((t["error"]["max_abs"] for t in h["tensors"]), default=0.0)
    cfg = h["method"].get("config", {})
    lines = [
        f"delta       {path}  (format {h['format_version']}, {h['kind']}{', since ' + h['since_sha256'][:16] + '…' if h['since_sha256'] else ''})",
        f"checksum    sha256 {delta.sha256}",
        f"signature   {delta.signature_status}" + (f" (key {delta.signer_fingerprint})" if delta.signer_fingerprint else ""),
        f"base model  sha256 {h['base_model_sha256']}",
        f"method      {h['method'].get('name')} " + " ".join(f"{k}={v}" for k, v in sorted(cfg.items())),
        f"tensors     {len(h['tensors'])} tensors, {params:,} values",
        f"codec       {h['codec']}: payload {human_bytes(payload)}, file {human_bytes(delta.size)} "
        f"(fp32 would be {human_bytes(4 * params)})",
        f"error       reconstruction: largest relative L2 {worst:.2e}, largest abs {worst_abs:.2e}",
        f"training    {h['num_examples']} examples; round {h['round_id'] or '—'}; metrics "
        + (", ".join(f"{k}={v:.4g}" for k, v in h['metrics'].items()) or "—"),
        f"created     {h['created_at']}",
    ]
    return {"text": "\n".join(lines), "header": h, "sha256": delta.sha256, "signature": delta.signature_status,
            "signer": delta.signer_fingerprint, "file_bytes": delta.size, "payload_bytes": payload}
