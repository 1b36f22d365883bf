"""What every method provides: a self-checking config and a torch-free spec (see ``edgetune.methods``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np

from edgetune.errors import BundleError, EdgetuneError

if TYPE_CHECKING:
    from edgetune.bundle import Manifest, TensorInfo


@dataclass(frozen=True)
class CliOption:
    """One ``edgetune export`` option that sets a method config field.

    Declared on the field: ``metadata={"help": ..., "cli": "--rank"}``; the kind follows the
    field's default (bool -> flag, tuple -> comma-separated list, dict -> comma-separated
    ``key=number`` pairs, int, float, str -> one of ``metadata["choices"]``).
    """

    flag: str
    field: str
    kind: str  # "flag" | "list" | "mapping" | "int" | "float" | "choice"
    help: str
    methods: tuple[str, ...]
    choices: tuple[str, ...] = ()  # kind "choice": the values allowed

    @property
    def dest(self) -> str:
        return f"method_{self.field}"  # the click parameter name; never clashes with export's own

    def shared_with(self, other: "CliOption") -> "CliOption":
        if (other.field, other.kind) != (self.field, self.kind):  # a programming error in a registry entry
            raise ValueError(f"{self.flag} means {self.field} ({self.kind}) and {other.field} ({other.kind})")
        return dataclasses.replace(self, methods=self.methods + other.methods)


@dataclass
class MethodConfig:
    """Base of method configs: dataclasses that check themselves and refuse keys they do not know."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise EdgetuneError(f"{self.name} config: " + "; ".join(problems) + ".")

    def problems(self) -> list[str]:
        """Every problem with the field values (all at once, not the first)."""
        return []

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "method config") -> "MethodConfig":
        if not isinstance(d, dict):
            raise EdgetuneError(f"{where}: a {cls.name} config must be a JSON object, got {type(d).__name__}.")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise EdgetuneError(f"{where}: unknown {cls.name} config key(s) {', '.join(map(repr, unknown))}; "
                                f"known keys: {', '.join(known)}.")
        return cls(**d)

    @classmethod
    def cli_options(cls) -> list[CliOption]:
        options = []
        for f in dataclasses.fields(cls):
            if "cli" not in f.metadata:
                continue
            if f.default_factory is dict:  # type: ignore[comparison-overlap]
                kind, shown = "mapping", "none"
            else:
                kind = ("flag" if isinstance(f.default, bool) else "list" if isinstance(f.default, tuple)
                        else "choice" if isinstance(f.default, str)
                        else "int" if isinstance(f.default, int) else "float")
                shown = ",".join(f.default) if kind == "list" else f.default
            help_text = f.metadata["help"] + ("" if kind == "flag" else f" [default: {shown}]")
            choices = tuple(f.metadata["choices"]) if kind == "choice" else ()
            options.append(CliOption(f.metadata["cli"], f.name, kind, help_text, (cls.name,), choices))
        return options

    @classmethod
    def from_cli(cls, given: dict) -> "MethodConfig":
        """The config from the options a user gave (field -> value); the rest keep their defaults."""
        options = {o.field: o for o in cls.cli_options()}
        values, problems = {}, []
        for k, v in given.items():
            kind = options[k].kind if k in options else None
            if kind == "list":
                v = tuple(t.strip() for t in v.split(",") if t.strip())
            elif kind == "mapping":
                v = _parse_pairs(options[k].flag, v, problems)
            values[k] = v
        if problems:
            raise EdgetuneError("export options: " + "; ".join(problems) + ".")
        return cls.from_dict(values, where="export options")


def _parse_pairs(flag: str, text: str, problems: list[str]) -> dict:
    """``'down_proj=16, o_proj=4'`` -> ``{"down_proj": 16, "o_proj": 4}`` (numbers as int when whole)."""
    pairs = {}
    for item in (t.strip() for t in text.split(",")):
        key, sep, value = (s.strip() for s in item.partition("="))
        try:
            if not (sep and key):
                raise ValueError
            number = float(value)
            pairs[key] = int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
        except ValueError:
            problems.append(f"{flag} takes name=number pairs separated by commas (e.g. down_proj=16), got {item!r}")
    return pairs


def head_tensors(manifest: "Manifest") -> set[str]:
    """Graph names of a task head trained whole beside the method's tensors (sequence-classification's
    linear head; PEFT's ``modules_to_save``). Empty for tasks without one."""
    names = (manifest.task_config or {}).get("head_tensors") or []
    return {n for n in names if isinstance(n, str)}


class MethodSpec:
    """The torch-free description of one method. Subclasses set the class attributes below."""

    name: str
    config_class: type[MethodConfig]
    layer_module: str  # the torch layer: edgetune.export.methods.<name>
    tensor_roles: tuple[str, ...]  # attribute names of the trainable tensors on one adapted layer
    ecosystem: str = "PEFT"  # who loads the folder `to-peft` writes (messages name it)
    folder_config_file: str = "adapter_config.json"  # that folder's files
    folder_weights: str = "adapter_model.safetensors"
    folder_load_hint: str = "peft.PeftModel.from_pretrained(base_model, {folder!r})"  # how the ecosystem loads it
    description: str = ""  # one line for ``edgetune export --help``
    quantized_base: str | None = None  # None: the frozen base may be quantized; else why it may not
    delta_from_base = False  # True: a delta holds the difference from the exported tensors (``to_delta``)
    # False: the training graph takes no packed rows (no position_ids input), e.g. because the method
    # numbers a row's positions itself (prefix tuning: real tokens start after the virtual ones).
    packs = True

    def config(self, manifest: "Manifest") -> MethodConfig:
        return self.config_class.from_dict(manifest.method.get("config"), where="the bundle's method config")

    @staticmethod
    def role(tensor: "TensorInfo") -> str:
        """``model.layers.0.self_attn.q_proj.lora_B`` -> ``lora_B``: the tensor's attribute on its layer."""
        return tensor.graph_name.rsplit(".", 1)[-1]

    def trainable(self, manifest: "Manifest") -> list["TensorInfo"]:
        """The trainable tensors the exporter declared in the manifest, each of a role this method knows
        (or a task head's: ``head_tensors``)."""
        head = head_tensors(manifest)
        strange = [t.graph_name for t in manifest.trainable if self.role(t) not in self.tensor_roles
                   and t.graph_name not in head]
        if strange:
            raise BundleError(f"the manifest's trainable tensors {', '.join(strange[:3])} are not {self.name} tensors "
                              f"({', '.join(self.tensor_roles)}); re-export the bundle.")
        return list(manifest.trainable)

    def summary(self, config: MethodConfig) -> str:
        """One line for ``inspect`` and the end of ``export``."""
        return self.name

    def adapter_off(self, manifest: "Manifest", adapter: dict[str, np.ndarray],
                    base: Callable[[], dict[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        """Tensors (graph name -> array) that make the model equal its base, given any ``adapter`` for it.

        ``base()`` returns the trainable tensors as exported (read only by methods that need them).
        """
        raise NotImplementedError

    def to_delta(self, tensors: dict[str, np.ndarray], base: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """What a delta ships for trained ``tensors``; ``base()``: the exported ones by the same keys."""
        return tensors

    def from_delta(self, tensors: dict[str, np.ndarray], base: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The trained tensors a delta's tensors stand for (inverse of ``to_delta``)."""
        return tensors

    def weight_delta(self, config: MethodConfig, layer: dict[str, np.ndarray], module_path: str = "") -> np.ndarray:
        """What merging adds to the base weight (out, in) of the layer at ``module_path``, from its tensors by role."""
        raise BundleError(f"method {self.name!r} cannot be merged into the generation graph.")

    def peft_key(self, module_path: str, role: str) -> str:
        """The key PEFT saves a tensor under."""
        return f"base_model.model.{module_path}.{role}.weight"

    def peft_config(self, config: MethodConfig, base_model: str) -> dict:
        """``adapter_config.json`` as PEFT writes it for ``config``."""
        raise NotImplementedError

    def task_peft_config(self, peft_config: dict, task: str, head: str) -> dict:
        """``peft_config`` for a task with a trained head (sequence-classification: PEFT's SEQ_CLS, the
        head saved whole as ``modules_to_save``)."""
        if task == "sequence-classification":
            return {**peft_config, "task_type": "SEQ_CLS", "modules_to_save": [head]}
        return peft_config

    # --- the ecosystem folder (`to-peft` / `from-peft`, edgetune.peft_io) ----------------------------
    def folder_key(self, key: str) -> str:
        """A key as found in a saved folder -> the manifest's ``peft_key`` (e.g. without an adapter name)."""
        return key

    def folder_config_problems(self, config: dict, manifest: "Manifest") -> list[str]:
        """What in a saved folder's config disagrees with the bundle's method config (empty: it fits)."""
        return []

    def folder_tensors(self, manifest: "Manifest", tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Trainable tensors by peft key -> the tensors the folder holds (by default the same)."""
        return tensors

    def folder_weight_files(self, manifest: "Manifest", tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """The folder's safetensors files: file name -> the tensors (by folder key) it holds."""
        return {self.folder_weights: tensors}

    def folder_weight_names(self, manifest: "Manifest") -> list[str]:
        """The safetensors files a saved folder must hold (``from-peft`` reads them all)."""
        return [self.folder_weights]

    def folder_extra_configs(self, manifest: "Manifest") -> dict[str, dict]:
        """JSON files written beside the main config (file name -> content)."""
        return {}

    def folder_save_hint(self, manifest: "Manifest") -> str:
        """How the ecosystem saves every file the folder needs (ends the missing-file message)."""
        return ""

    def folder_shapes(self, manifest: "Manifest") -> dict[str, tuple]:
        """Key -> shape of what a saved folder must hold."""
        return manifest.trainable_shapes()

    def from_folder_tensors(self, manifest: "Manifest", tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inverse of ``folder_tensors`` (validated tensors) -> trainable tensors by peft key."""
        return tensors

    # --- generation ------------------------------------------------------------------------------
    def initial_past(self, manifest: "Manifest", adapter: dict[str, np.ndarray]) -> list[np.ndarray] | None:
        """The generation graph's initial key/value cache for ``adapter`` (one (1, kv_heads, n, head_dim)
        array per past input, in the manifest's order), or None: an empty cache."""
        return None
