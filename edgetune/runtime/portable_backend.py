"""The ``portable`` backend: the stock ``onnxruntime`` package, on any CPU and Python it ships for.

The bundle's portable gradient graph (``manifest.portable["file"]``) holds the frozen weights and
takes the batch plus every trainable tensor as inputs; it outputs the micro-batch's loss and one
gradient per trainable tensor. An ``InferenceSession`` runs it; the rest of what ORT's training API
does is here, in numpy:

- gradient accumulation: the sum of the micro-batch gradients since the last optimizer step, as
  ORT's ``InPlaceAccumulatorV2`` adds them (no averaging);
- AdamW outside the graph (``edgetune.runtime.adamw``) with the bundle's hyper-parameters;
- checkpoints in ORT's own format (``edgetune.runtime.ort_checkpoint``), so either backend
  resumes from the other's.

Nothing here imports ``onnxruntime.training``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgetune.errors import BundleError, EdgetuneError
from edgetune.runtime.adamw import AdamWHyper, AdamWState, adamw_step
from edgetune.runtime.backend import Batch
from edgetune.runtime.batches import graph_inputs
from edgetune.runtime.ort_checkpoint import TrainableState, read_trainable, write_checkpoint
from edgetune.runtime.ort_import import onnxruntime
from edgetune.runtime.session_options import training_options

if TYPE_CHECKING:
    from edgetune.bundle import Bundle


def portable_graphs(bundle: "Bundle") -> dict:
    """The manifest's ``portable`` entry, checked; BundleError (with the way out) when it cannot train."""
    manifest = bundle.manifest
    info = manifest.portable
    if not info:
        raise BundleError(f"bundle {str(bundle.folder)!r} has no portable graph (it was exported by an older edgetune); "
                          "re-export it, or use --backend ort-training where onnxruntime-training-cpu installs "
                          "(x86-64 Linux, Python 3.10/3.11).")
    if not info.get("supported"):
        ops = ", ".join(_operator(op) for op in (info.get("unsupported") or [])[:8]) or "unknown operators"
        raise BundleError(f"bundle {str(bundle.folder)!r} is not portable: its training graph uses operators the stock "
                          f"onnxruntime cannot run ({ops}); use --backend ort-training (x86-64 Linux, Python 3.10/3.11).")
    problems = []
    for key, role in (("file", "portable"), ("eval_file", "portable_eval")):
        if info.get(key) != bundle.file_name(role):  # the Bundle checked that file: inside, listed, hashed
            problems.append(f"{key} is {info.get(key)!r}, the bundle lists {bundle.file_name(role)!r}")
    gradients = info.get("gradients") if isinstance(info.get("gradients"), dict) else {}
    absent = [t.graph_name for t in manifest.trainable if not isinstance(gradients.get(t.graph_name), str)]
    if absent:
        problems.append(f"no gradient output named for {', '.join(absent[:3])}")
    if not isinstance(info.get("loss"), str):
        problems.append(f"loss output is {info.get('loss')!r}")
    if problems:
        raise BundleError(f"bundle {str(bundle.folder)!r}: portable graph entry is unusable ({'; '.join(problems)}); re-export the bundle.")
    return info


def _operator(entry) -> str:
    """An ``unsupported`` entry ({"op_type", "node", ...}) as "OpType (node name)"."""
    if isinstance(entry, dict):
        return f"{entry.get('op_type', '?')} (node {entry.get('node', '?')})"
    return str(entry)


class PortableBackend:
    name = "portable"

    def __init__(self, bundle: "Bundle", *, checkpoint: Path | None = None, threads: int = 0,
                 with_eval: bool = False, training: bool = True):
        manifest = bundle.manifest
        self._bundle = bundle
        self._hyper = AdamWHyper.from_manifest(manifest.optimizer)
        self._names = [t.graph_name for t in manifest.trainable]
        self._inputs = [(i.name, np.dtype(i.dtype)) for i in manifest.inputs]  # dpo adds float32 ref_logps
        self._threads = threads
        self._train = self._eval = None  # sessions; built now when opened to run, else on first use
        if training:  # so that a step's time and memory are the step's own
            self._training_session()
        if with_eval:
            self._eval_session()
        source = Path(checkpoint) if checkpoint is not None else bundle.path("checkpoint")
        state = read_trainable(source, self._names)
        shapes = {t.graph_name: tuple(t.shape) for t in manifest.trainable}
        wrong = [f"{n} is {a.shape}, the bundle has {shapes[n]}" for n, a in state.params.items() if a.shape != shapes[n]]
        if wrong:
            raise BundleError(f"checkpoint {str(source)!r} does not fit the bundle: {'; '.join(wrong[:3])}; pass --restart.")
        self._params = state.params
        self._adamw = state.adamw or AdamWState()
        self._learning_rate = state.learning_rate
        self._grads: dict[str, np.ndarray] | None = None  # sum over micro-batches since the last step

    # --- sessions (reading or writing tensors needs none: a bundle without portable graphs still
    # gives its initial adapter and checkpoints) -------------------------------------------------
    def _graphs(self) -> dict:
        info = portable_graphs(self._bundle)
        self._loss = info["loss"]
        self._grad_outputs = [info["gradients"][n] for n in self._names]
        return info

    def _training_session(self):
        if self._train is None:
            self._graphs()
            self._train = self._session(self._bundle.path("portable"), [self._loss, *self._grad_outputs])
        return self._train

    def _eval_session(self):
        if self._eval is None:
            self._graphs()
            self._eval = self._session(self._bundle.path("portable_eval"), [self._loss])
        return self._eval

    def _session(self, path: Path, outputs: list[str]):
        ort = onnxruntime()
        try:
            session = ort.InferenceSession(str(path), training_options(self._threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT reports load failures as its own exception types
            raise BundleError(f"{path}: the stock onnxruntime {ort.__version__} cannot load it ({str(exc)[:300]}); "
                              "re-export the bundle or use --backend ort-training.") from None
        have_in = {i.name for i in session.get_inputs()}
        have_out = {o.name for o in session.get_outputs()}
        absent = [n for n in (*(n for n, _ in self._inputs), *self._names) if n not in have_in] + [n for n in outputs if n not in have_out]
        if absent:
            raise BundleError(f"{path}: graph lacks {', '.join(absent[:3])} named by the manifest; re-export the bundle.")
        return session

    def _feed(self, batch: Batch) -> dict[str, np.ndarray]:
        names, dtypes = [n for n, _ in self._inputs], [d for _, d in self._inputs]
        feed = dict(zip(names, graph_inputs(batch, names, dtypes)))  # position_ids 0..T-1 when absent
        feed.update(self._params)
        return feed

    def train_step(self, batch: Batch) -> float:
        loss, *grads = self._training_session().run([self._loss, *self._grad_outputs], self._feed(batch))
        if self._grads is None:
            self._grads = dict(zip(self._names, grads))
        else:
            for name, g in zip(self._names, grads):
                self._grads[name] += g
        return float(loss)

    def optimizer_step(self, learning_rate: float) -> None:
        if self._grads is None:
            raise EdgetuneError("optimizer_step without gradients: call train_step first.")
        adamw_step(self._params, self._grads, self._adamw, self._hyper, float(learning_rate))
        self._learning_rate = float(learning_rate)
        self._grads = None

    def discard_gradients(self) -> None:
        self._grads = None

    def eval_loss(self, batch: Batch) -> float:
        (loss,) = self._eval_session().run([self._loss], self._feed(batch))
        return float(loss)

    def trainable(self) -> dict[str, np.ndarray]:
        return {name: self._params[name].copy() for name in self._names}

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            self._params[name] = np.array(value, dtype=np.float32, order="C")

    def initial_adapter(self) -> dict[str, np.ndarray]:
        return read_trainable(self._bundle.path("checkpoint"), self._names).params

    def save(self, path: Path) -> None:
        state = TrainableState(self.trainable(), self._adamw, self._learning_rate)
        write_checkpoint(Path(path), self._bundle.path("checkpoint"), state)
