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
from typing import Iterable

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
    # How the frozen linear layers multiply: None = MatMul on DequantizeLinear (fp32) weights, which
    # ONNX Runtime folds into fp32 copies at load (bundles exported before the int8 kernels);
    # "int8-split-nibbles" = MatMulNBits on the int8 values, "int4-blocks" = MatMulNBits on the training
    # graph's int4 blocks (embedding and a tied head: split int8) (edgetune/export/generation_kernels.py).
    linear_kernel: str | None = None


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
    # The portable gradient graph for the stock onnxruntime package (None: exported before it
    # existed): {"file", "eval_file", "supported", "unsupported": [{"op_type", "node", ...}],
    # "gradients": {graph_name: output name}, "loss"}; see edgetune/export/portable/.
    portable: dict | None = None
    task_config: dict = field(default_factory=dict)  # the task's settings, e.g. dpo: {"beta": 0.1}

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


def _refuse_mismatch(folder: Path, manifest: Manifest, names) -> None:
    """BundleError naming every file of ``names`` whose SHA-256 differs from the manifest's."""
    bad = [name for name in names if sha256_file(folder / name) != manifest.files[name]]
    if bad:
        raise BundleError(
            f"bundle {str(folder)!r}: {', '.join(bad)} do(es) not match the manifest's SHA-256; "
            "the files are damaged or were changed after export — copy or re-export the bundle."
        )


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Hash every artifact file in ``folder`` into the manifest, then write ``edgetune.json``."""
    manifest.files = {
        p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def read_manifest(folder: Path | str, verify: bool = True) -> Manifest:
    """The manifest of a validated bundle folder; prefer ``Bundle.open`` (it also resolves file roles)."""
    return Bundle.open(folder, verify=verify).manifest


# File role -> the name the exporter writes; ``generation`` and ``tokenizer`` come from the manifest.
ROLE_FILES = {
    "training": "training_model.onnx",
    "eval": "eval_model.onnx",
    "optimizer": "optimizer_model.onnx",
    "checkpoint": "checkpoint",  # ONNX Runtime training checkpoint: all parameters + AdamW moments
    "portable": "portable_model.onnx",  # stock-onnxruntime backend graphs (edgetune/export/portable/)
    "portable_eval": "portable_eval_model.onnx",
    "classifier": "classifier_model.onnx",  # sequence-classification: logits, adapter and head as inputs
    "fixed_adapter": "fixed_adapter.safetensors",  # adapter tensors never trained (FFA-LoRA's A), edgetune/fixed_adapter.py
}
ROLES = (*ROLE_FILES, "generation", "tokenizer")
# What `generate` (and the Answerer) reads: the KV-cache graph, the tokenizer, the exported adapter
# (only when nothing was trained, or to switch a full fine-tune off) and any fixed adapter tensors.
GENERATE_ROLES = ("generation", "tokenizer", "checkpoint", "fixed_adapter")
STATE_DIR = "train-state"


class Bundle:
    """One bundle folder whose manifest and files were validated (and hashed) once.

    Every file an engine opens is named in ``manifest.files``, lies strictly inside ``folder``
    (no ``..``, no absolute path, no symlink out; ONNX external data included) and matched its
    SHA-256 before it was first handed out. Anything else in the folder is never read. Callers ask
    ``path(role)`` instead of joining file names.

    ``verify``: True hashes every listed file when the bundle is opened; a collection of roles
    (``GENERATE_ROLES``) hashes only the files of those roles, each the first time ``path`` gives it
    out (a command that reads a third of the bundle hashes a third), and ``path`` refuses every other
    role, so a file that was not hashed is never opened; False hashes nothing (the caller just wrote
    the bundle, or means to read it unverified).
    """

    def __init__(self, folder: Path, manifest: Manifest, verified: bool, roles: frozenset[str] | None = None):
        self.folder = folder
        self.manifest = manifest
        self.verified = verified  # every file a path() hands out was (or is, on first use) hashed
        self._roles = roles  # None: all roles allowed (hashed at open, or not at all)
        self._checked: set[str] = set()

    @classmethod
    def open(cls, folder: Path | str, *, verify: bool | Iterable[str] = True) -> "Bundle":
        from edgetune.bundle_paths import check_external_data, check_listed_paths

        roles = None if isinstance(verify, bool) else frozenset(verify)
        unknown = sorted(roles - set(ROLES)) if roles is not None else []
        if unknown:
            raise ValueError(f"unknown bundle file role(s) {', '.join(unknown)}; known: {', '.join(ROLES)}")
        folder = Path(folder)
        if not folder.is_dir():
            raise BundleError(f"bundle {str(folder)!r} is not a folder; give the folder `edgetune export` wrote.")
        path = folder / MANIFEST
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"bundle {str(folder)!r} has no {MANIFEST}; it is not an edgetune bundle or was not finished.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc}); re-export the bundle.") from None
        if not isinstance(data, dict):
            raise BundleError(f"{path}: the manifest is not a JSON object; re-export the bundle.")
        manifest = Manifest.from_dict(data, where=str(path))
        check_listed_paths(folder, manifest)  # names and file kinds only: nothing is read
        if roles is not None:
            return cls(folder, manifest, True, roles)
        if verify:
            _refuse_mismatch(folder, manifest, manifest.files)
        check_external_data(folder, manifest)
        return cls(folder, manifest, bool(verify))

    def _check_role(self, role: str, name: str) -> None:
        """With ``verify=roles``: refuse a role outside them; hash ``name`` (with the checkpoint's
        sidecar and the external data of a graph) once, before anything opens it."""
        from edgetune.bundle_paths import CHECKPOINT_EXTERNAL_SUFFIX, check_external_data

        if self._roles is None or role in self._checked:
            return
        if role not in self._roles:
            raise ValueError(f"{self!r} was opened to verify only {', '.join(sorted(self._roles))}; "
                             f"its {role} file is unverified and must not be read (add the role to verify=)")
        names = [name]
        sidecar = name + CHECKPOINT_EXTERNAL_SUFFIX
        if role == "checkpoint" and sidecar in self.manifest.files:
            names.append(sidecar)  # ONNX Runtime reads it beside the checkpoint
        _refuse_mismatch(self.folder, self.manifest, names)  # the graph is hashed before it is parsed
        _refuse_mismatch(self.folder, self.manifest, sorted(check_external_data(self.folder, self.manifest, [name])))
        self._checked.add(role)

    def file_name(self, role: str) -> str | None:
        """The bundle-relative name of ``role``'s file, or None when the bundle has no such file."""
        if role == "generation":
            name = self.manifest.generation.file if self.manifest.generation else None
        elif role == "tokenizer":
            name = self.manifest.tokenizer.file
        elif role in ROLE_FILES:
            name = ROLE_FILES[role]
        else:
            raise ValueError(f"unknown bundle file role {role!r}; known: {', '.join(ROLES)}")
        return name if name in self.manifest.files else None

    def has(self, role: str) -> bool:
        return self.file_name(role) is not None

    def path(self, role: str) -> Path:
        """The checked path of ``role``'s file; BundleError when the bundle has none."""
        name = self.file_name(role)
        if name is None:
            raise BundleError(f"bundle {str(self.folder)!r} has no {role} file; re-export it with this edgetune.")
        self._check_role(role, name)
        return self.folder / name

    def state_folder(self, override: Path | None = None) -> Path:
        """Where training state lives: ``override`` (``--state-dir``) or ``<bundle>/train-state``.

        The default must be a real folder in the bundle: a bundle from elsewhere could ship
        ``train-state`` as a symlink to a folder of the device's."""
        if override is not None:
            return Path(override)
        default = self.folder / STATE_DIR
        if default.is_symlink():
            raise BundleError(f"bundle {str(self.folder)!r}: {STATE_DIR} is a symlink; remove it or give --state-dir.")
        return default

    def __repr__(self) -> str:
        return f"Bundle({str(self.folder)!r})"
