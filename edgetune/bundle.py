"""The bundle manifest (``edgetune.json``): schema, read, write, validate.

Shared by both halves: the exporter writes it, the runtime, delta tools and collector read it.
Everything the device needs to train and generate is in the bundle folder; nothing else is read.
Schema changes bump ``SCHEMA_VERSION``; readers refuse versions they do not know.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgetune.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "edgetune.json"


@dataclass
class TensorInfo:
    """A tensor the bundle knows by name. ``quantization`` is "none" or an int8 scheme."""

    graph_name: str  # initializer / checkpoint name in the training graph
    shape: list[int]
    dtype: str = "float32"
    peft_key: str | None = None  # trainable tensors: the key PEFT saves it under
    quantization: str = "none"


@dataclass
class GraphInput:
    name: str
    dtype: str
    dims: list  # ints for fixed dims, strings for dynamic ones ("batch", "sequence")


@dataclass
class TokenizerInfo:
    file: str = "tokenizer.json"
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token_id: int = 0
    stop_token_ids: list[int] = field(default_factory=list)  # end of turn / end of text


@dataclass
class GenerationInfo:
    """The inference graph with a key/value cache; adapter tensors are graph inputs."""

    file: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    past_inputs: list[str]  # past_key_values.{i}.key / .value, (B, kv_heads, past, head_dim)
    present_outputs: list[str]
    adapter_inputs: dict[str, str]  # generation-graph input name -> training graph_name
    has_position_ids: bool = True


@dataclass
class Manifest:
    base_model: dict  # {"id", "sha256", "model_type", "source", "config": {...}}
    task: str  # "causal-lm"
    method: dict  # {"name", "config": {...}, "peft_config": {...}}
    optimizer: dict  # {"name": "adamw", "betas", "eps", "weight_decay"}
    trainable: list[TensorInfo]
    frozen: list[TensorInfo]
    quantization: str  # "none" | "int8"
    inputs: list[GraphInput]
    outputs: list[str]
    tokenizer: TokenizerInfo
    generation: GenerationInfo | None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    schema_version: int = SCHEMA_VERSION
    producer: dict = field(default_factory=dict)

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> "Manifest":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{where}: schema version {version!r} is not supported by this edgetune (knows {SCHEMA_VERSION}); "
                "re-export the bundle with this version or upgrade edgetune."
            )
        try:
            return cls(
                **{
                    **d,
                    "trainable": [TensorInfo(**t) for t in d["trainable"]],
                    "frozen": [TensorInfo(**t) for t in d["frozen"]],
                    "inputs": [GraphInput(**i) for i in d["inputs"]],
                    "tokenizer": TokenizerInfo(**d["tokenizer"]),
                    "generation": GenerationInfo(**d["generation"]) if d.get("generation") else None,
                }
            )
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{where}: manifest is malformed ({exc}); re-export the bundle.") from None

    @property
    def base_sha256(self) -> str:
        return self.base_model["sha256"]

    def trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        """PEFT key -> shape: what a delta for this bundle must contain."""
        return {t.peft_key: tuple(t.shape) for t in self.trainable}

    def peft_to_graph(self) -> dict[str, str]:
        return {t.peft_key: t.graph_name for t in self.trainable}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Hash every artifact file in ``folder`` into the manifest, then write ``edgetune.json``."""
    manifest.files = {
        p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def read_manifest(folder: Path | str, verify: bool = True) -> Manifest:
    """Read and validate a bundle folder. ``verify`` re-hashes every artifact (about 1 s per GB)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle {str(folder)!r} is not a folder; give the folder `edgetune export` wrote.")
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"bundle {str(folder)!r} has no {MANIFEST}; it is not an edgetune bundle or was not finished.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); re-export the bundle.") from None
    manifest = Manifest.from_dict(data, where=str(path))
    missing = [name for name in manifest.files if not (folder / name).is_file()]
    if missing:
        raise BundleError(f"bundle {str(folder)!r} is incomplete: missing {', '.join(missing)}; re-export or copy it again.")
    if verify:
        bad = [name for name, digest in manifest.files.items() if sha256_file(folder / name) != digest]
        if bad:
            raise BundleError(
                f"bundle {str(folder)!r}: {', '.join(bad)} do(es) not match the manifest's SHA-256; "
                "the files are damaged or were changed after export — copy or re-export the bundle."
            )
    return manifest
