"""ONNX Runtime training checkpoints, read and written without the training build.

Both backends keep their state in ORT's own checkpoint format, so a checkpoint written by either
resumes in the other, and in ORT's on-device training APIs on Android, iOS and Linux:

- ``ort-training`` writes it with ``CheckpointState.save_checkpoint`` (all parameters, AdamW
  moments, step); its Python API exposes parameters but not the optimizer state, so a second,
  backend-neutral file (say safetensors with the moments) could not be restored into it. One format
  that both sides read completely avoids that, and avoids two files that could disagree.
- ``portable`` (the stock ``onnxruntime`` package, no training API) reads and writes the same
  flatbuffer here. The bundle's ``checkpoint`` (the exported initial adapter) is one too, which is
  how ``eval``, ``generate`` and ``delta`` read the initial adapter without the training build.

The format (ORT's ``ort.fbs``, file identifier ``ODTC``, version 2)::

    Checkpoint { version, module_state: ModuleState, optimizer_groups: [OptimizerGroup] }
    ModuleState { requires_grad_params: [Tensor], frozen_params: [Tensor] }
    OptimizerGroup { group_name "group0", step, initial_learning_rate,
                     optimizer_states: [ParameterOptimizerState { param_name,
                                                                  momentums: [Tensor "momentum0", "momentum1"] }] }
    Tensor { name, dims: [int64], data_type (ONNX TensorProto enum), raw_data: [uint8] }

The readers and builders are the flatbuffers code that ORT generates from that schema and ships in
every wheel (``onnxruntime/tools/ort_format_model/ort_flatbuffers_py``). Its package
``onnxruntime.tools`` imports torch when torch is installed and the generated modules import each
other as a top-level ``ort_flatbuffers_py``, so that folder is registered under that name directly.
A checkpoint is untrusted input: anything malformed is a ``TrainingError`` naming the file.
"""

from __future__ import annotations

import importlib
import importlib.util
import mmap
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.errors import TrainingError
from edgetune.runtime.adamw import AdamWState

IDENTIFIER = b"ODTC"
VERSION = 2
FLOAT = 1  # ONNX TensorProto.FLOAT
MOMENTUMS = ("momentum0", "momentum1")  # exp_avg, exp_avg_sq
GROUP = "group0"


@dataclass
class TrainableState:
    """What a checkpoint holds for training: trainable tensors, AdamW state (None: never stepped)."""

    params: dict[str, np.ndarray]  # graph name -> float32 array
    adamw: AdamWState | None
    learning_rate: float = 0.0


def _fbs():
    """ORT's generated flatbuffers package ``ort_flatbuffers_py.fbs``, imported without ``onnxruntime.tools``."""
    if "ort_flatbuffers_py" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        folder = None
        if spec is not None and spec.submodule_search_locations:
            folder = Path(list(spec.submodule_search_locations)[0]) / "tools" / "ort_format_model" / "ort_flatbuffers_py"
        if folder is None or not (folder / "fbs" / "Checkpoint.py").is_file():
            raise TrainingError("this onnxruntime installation lacks its checkpoint schema "
                                "(onnxruntime/tools/ort_format_model); reinstall onnxruntime.")
        package = types.ModuleType("ort_flatbuffers_py")
        package.__path__ = [str(folder)]
        sys.modules["ort_flatbuffers_py"] = package
    return importlib.import_module("ort_flatbuffers_py.fbs")


def _open(path: Path):
    """(mmap, root Checkpoint table) of ``path``; TrainingError when it is not an ORT checkpoint."""
    fbs = _fbs()
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"checkpoint {str(path)!r} cannot be read ({exc}); pass --restart to start over.") from None
    if len(buf) < 8 or buf[4:8] != IDENTIFIER:
        raise TrainingError(f"{str(path)!r} is not an ONNX Runtime training checkpoint; pass --restart to start over.")
    root = fbs.Checkpoint.Checkpoint.GetRootAs(buf, 0)
    return buf, root


def _array(tensor, where: str) -> np.ndarray:
    if tensor.DataType() != FLOAT:
        raise TrainingError(f"{where}: tensor {tensor.Name()!r} is not float32 (type {tensor.DataType()}).")
    dims = tuple(int(d) for d in tensor.DimsAsNumpy()) if not tensor.DimsIsNone() else ()
    raw = tensor.RawDataAsNumpy()
    count = int(np.prod(dims, dtype=np.int64))
    if isinstance(raw, int) or raw.size != 4 * count:  # RawDataAsNumpy returns 0 when absent
        raise TrainingError(f"{where}: tensor {tensor.Name()!r} holds {0 if isinstance(raw, int) else raw.size} bytes, "
                            f"its shape {dims} needs {4 * count}.")
    return raw.view("<f4").reshape(dims).astype(np.float32)  # a copy: the mmap is closed after reading


def read_trainable(path: Path, names: list[str]) -> TrainableState:
    """The tensors ``names`` and, when the checkpoint has one, their AdamW state."""
    path = Path(path)
    buf, root = _open(path)
    try:
        return _read(root, names, str(path))
    except TrainingError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged flatbuffer fails in struct/index/unicode code
        raise TrainingError(f"checkpoint {str(path)!r} is damaged ({type(exc).__name__}: {exc}); "
                            "pass --restart to start over.") from None
    finally:
        buf.close()


def _read(root, names: list[str], where: str) -> TrainableState:
    if root.Version() != VERSION:
        raise TrainingError(f"{where}: checkpoint version {root.Version()} is not supported (knows {VERSION}).")
    module = root.ModuleState()
    if module is None:
        raise TrainingError(f"{where}: the checkpoint has no parameters.")
    found = {}
    for i in range(module.RequiresGradParamsLength()):
        t = module.RequiresGradParams(i)
        name = t.Name().decode()
        if name in names:
            found[name] = _array(t, where)
    missing = [n for n in names if n not in found]
    if missing:
        raise TrainingError(f"{where}: the checkpoint lacks trainable tensors {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}; it belongs to another bundle — pass --restart.")
    if root.OptimizerGroupsLength() == 0:
        return TrainableState(found, None)
    group = root.OptimizerGroups(0)
    state = AdamWState(step=int(group.Step()))
    for i in range(group.OptimizerStatesLength()):
        s = group.OptimizerStates(i)
        name = s.ParamName().decode()
        if name not in found:
            continue
        moments = {s.Momentums(k).Name().decode(): _array(s.Momentums(k), where) for k in range(s.MomentumsLength())}
        if set(moments) != set(MOMENTUMS):
            raise TrainingError(f"{where}: optimizer state of {name} has {sorted(moments)}, expected {list(MOMENTUMS)}.")
        state.exp_avg[name], state.exp_avg_sq[name] = moments[MOMENTUMS[0]], moments[MOMENTUMS[1]]
    absent = [n for n in names if n not in state.exp_avg]
    if absent or state.step < 0:
        raise TrainingError(f"{where}: optimizer state is incomplete (no moments for {', '.join(absent[:3])}, "
                            f"step {state.step}); pass --restart.")
    return TrainableState(found, state, float(group.InitialLearningRate()))


def write_checkpoint(path: Path, template: Path, state: TrainableState) -> None:
    """Write ``state`` as a complete ORT checkpoint at ``path``: the trainable tensors and moments
    from ``state``, every frozen tensor copied byte for byte from ``template`` (the bundle's
    ``checkpoint``), so ``CheckpointState.load_checkpoint`` in the training build resumes from it."""
    import flatbuffers

    fbs = _fbs()
    template = Path(template)
    buf, root = _open(template)
    try:
        module = root.ModuleState()
        frozen = [module.FrozenParams(i) for i in range(module.FrozenParamsLength())]
        size = sum(t.RawDataLength() for t in frozen) + sum(3 * a.nbytes for a in state.params.values())
        builder = flatbuffers.Builder(size + (1 << 20))  # sized once: growing copies the whole buffer
        frozen_offsets = [_tensor(builder, fbs, t.Name().decode(), t.DimsAsNumpy(), t.DataType(), t.RawDataAsNumpy())
                          for t in frozen]
    finally:
        buf.close()
    names = list(state.params)
    trainable_offsets = [_float_tensor(builder, fbs, n, state.params[n]) for n in names]
    adamw = state.adamw or AdamWState()
    param_states = []
    for n in names:
        zeros = np.zeros_like(state.params[n])
        moments = [_float_tensor(builder, fbs, MOMENTUMS[0], adamw.exp_avg.get(n, zeros)),
                   _float_tensor(builder, fbs, MOMENTUMS[1], adamw.exp_avg_sq.get(n, zeros))]
        moments_vec = _offsets_vector(builder, fbs.ParameterOptimizerState.StartMomentumsVector, moments)
        name = builder.CreateString(n)
        fbs.ParameterOptimizerState.Start(builder)
        fbs.ParameterOptimizerState.AddParamName(builder, name)
        fbs.ParameterOptimizerState.AddMomentums(builder, moments_vec)
        param_states.append(fbs.ParameterOptimizerState.End(builder))
    states_vec = _offsets_vector(builder, fbs.OptimizerGroup.StartOptimizerStatesVector, param_states)
    group_name = builder.CreateString(GROUP)
    fbs.OptimizerGroup.Start(builder)
    fbs.OptimizerGroup.AddGroupName(builder, group_name)
    fbs.OptimizerGroup.AddStep(builder, int(adamw.step))
    fbs.OptimizerGroup.AddInitialLearningRate(builder, float(state.learning_rate))
    fbs.OptimizerGroup.AddOptimizerStates(builder, states_vec)
    group = fbs.OptimizerGroup.End(builder)
    groups_vec = _offsets_vector(builder, fbs.Checkpoint.StartOptimizerGroupsVector, [group])

    trainable_vec = _offsets_vector(builder, fbs.ModuleState.StartRequiresGradParamsVector, trainable_offsets)
    frozen_vec = _offsets_vector(builder, fbs.ModuleState.StartFrozenParamsVector, frozen_offsets)
    fbs.ModuleState.Start(builder)
    fbs.ModuleState.AddRequiresGradParams(builder, trainable_vec)
    fbs.ModuleState.AddFrozenParams(builder, frozen_vec)
    module_state = fbs.ModuleState.End(builder)

    fbs.Checkpoint.Start(builder)
    fbs.Checkpoint.AddVersion(builder, VERSION)
    fbs.Checkpoint.AddModuleState(builder, module_state)
    fbs.Checkpoint.AddOptimizerGroups(builder, groups_vec)
    builder.Finish(fbs.Checkpoint.End(builder), file_identifier=IDENTIFIER)
    with open(path, "wb") as f:
        f.write(memoryview(builder.Bytes)[builder.Head():])  # no copy of the (large) finished buffer


def _float_tensor(builder, fbs, name: str, array: np.ndarray) -> int:
    a = np.ascontiguousarray(array, dtype="<f4")
    return _tensor(builder, fbs, name, np.asarray(a.shape, dtype=np.int64), FLOAT, a.reshape(-1).view(np.uint8))


def _tensor(builder, fbs, name: str, dims, data_type: int, raw) -> int:
    name_off = builder.CreateString(name)
    dims_off = builder.CreateNumpyVector(np.asarray(dims if not isinstance(dims, int) else [], dtype="<i8"))
    raw_off = builder.CreateNumpyVector(np.asarray(raw if not isinstance(raw, int) else [], dtype=np.uint8))
    fbs.Tensor.Start(builder)
    fbs.Tensor.AddName(builder, name_off)
    fbs.Tensor.AddDims(builder, dims_off)
    fbs.Tensor.AddDataType(builder, data_type)
    fbs.Tensor.AddRawData(builder, raw_off)
    return fbs.Tensor.End(builder)


def _offsets_vector(builder, start, offsets: list[int]) -> int:
    start(builder, len(offsets))
    for off in reversed(offsets):  # flatbuffers vectors are built back to front
        builder.PrependUOffsetTRelative(off)
    return builder.EndVector()
