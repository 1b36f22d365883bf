"""The generation graph: one decoder with a key/value cache, the adapter tensors as graph inputs.

optimum's ONNX exporter traces the model for ``text-generation-with-past`` (it patches the
attention-mask construction and the cache so the trace is valid for any past length, 0
included). One graph serves both the prompt step (past_len 0) and every next token:

  inputs   input_ids (B, T) int64, attention_mask (B, past+T) int64, position_ids (B, T) int64,
           past_key_values.{i}.key / .value (B, kv_heads, past, head_dim) float32,
           one float32 input per adapter tensor, fixed shape (e.g. lora_A (r, in), lora_B (out, r))
  outputs  logits (B, T, V) float32, present.{i}.key / .value (B, kv_heads, past+T, head_dim)

The adapter tensors are inputs rather than weights so the device feeds its current adapter
with no re-export. With ``quantize``, the frozen linear layers then run ``MatMulNBits`` on the
int8 values (``generation_kernels``): no fp32 copy of a frozen weight exists at any time.
Constant folding is off, and the adapter tensors get distinct random values during the trace,
because the TorchScript exporter otherwise renames them and merges equal ones (all-zero lora_B's)
into one initializer.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edgetune.bundle import GenerationInfo
from edgetune.constants import OPSET
from edgetune.errors import ExportError
from edgetune.export.generation_kernels import KERNEL, KERNEL_INT4, int4_linears_to_nbits, int8_linears_to_nbits
from edgetune.export.methods import Trainable
from edgetune.export.training_graph import graph_name
from edgetune.onnx_graph import save_model

TASK = "text-generation-with-past"
MAX_IR_VERSION = 10  # onnxruntime(-training) 1.19.2 loads IR <= 10; onnx >= 1.18 writes IR 14


def export_generation_graph(model, trainables: list[Trainable], path: Path, quantize: bool,
                            int4_block_size: int | None = None) -> GenerationInfo:
    """Write the KV-cache decoder of ``model`` (a LoRA-injected ``*ForCausalLM``) to ``path``.

    ``quantize`` stores every frozen 2-D fp32 weight (linear layers, embedding table) as int8 per
    row, read by MatMulNBits (linear layers) and an int8 Gather (embedding); the adapter inputs
    stay fp32. With ``int4_block_size`` (an int4 bundle) the linear weights are int4 blocks as in
    the training graph instead. The model is left as it was given (values, config, mode).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".generation.", dir=path.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        _trace(model, trainables, raw)
        proto = onnx.load(str(raw))  # loads external data too, if torch wrote any (> 2 GB)
    adapter_inputs = adapter_tensors_to_inputs(proto, trainables)
    if quantize:
        from edgetune.export.quantize import quantize_graph

        frozen = [t.name for t in proto.graph.initializer if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT]
        int4 = []
        if int4_block_size is not None:
            from edgetune.export.quantize_int4 import linear_weights

            int4 = int4_linears_to_nbits(proto, linear_weights(proto, frozen), int4_block_size)
        quantize_graph(proto, [n for n in frozen if n not in set(int4)])
        int8 = int8_linears_to_nbits(proto)
        kernel = KERNEL_INT4 if int4 else KERNEL if int8 else None
    else:
        kernel = None
    if proto.ir_version > MAX_IR_VERSION:
        raise ExportError(
            f"the generation graph has ONNX IR version {proto.ir_version}, but onnxruntime 1.19.2 reads at most "
            f"{MAX_IR_VERSION}; install onnx<1.18 and export again."
        )
    info = _info(proto, path.name, adapter_inputs)
    info.linear_kernel = kernel
    save_model(proto, path)
    return info


def _trace(model, trainables: list[Trainable], out: Path) -> None:
    """optimum's exporter on ``model`` with distinct adapter values; restores the model afterwards."""
    import torch
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.onnx import export
    from optimum.exporters.tasks import TasksManager

    params = [model.get_submodule(t.module_path).get_parameter(t.attr) for t in trainables]
    saved = [p.detach().clone() for p in params]
    config = model.config
    saved_config = {k: getattr(config, k, None) for k in ("use_cache", "return_dict")}
    was_training = model.training
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            model=model, exporter="onnx", task=TASK, library_name="transformers"
        )
        onnx_config = constructor(config, int_dtype="int64", float_dtype="fp32", use_past=True, use_past_in_inputs=True)
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():  # distinct values: keeps each adapter tensor its own named initializer
            for p in params:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        with warnings.catch_warnings():  # TracerWarnings about shape-dependent Python branches
            warnings.simplefilter("ignore")
            export(model, onnx_config, out, opset=OPSET, do_constant_folding=False)
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
        for k, v in saved_config.items():
            setattr(config, k, v)
        model.train(was_training)


def adapter_tensors_to_inputs(proto: onnx.ModelProto, trainables: list[Trainable]) -> dict[str, str]:
    """Turn each adapter initializer into a float32 graph input of the same name and fixed shape.

    Returns generation-input name -> training graph_name. The traced initializer name is the
    model's parameter name (``model.layers.0.self_attn.q_proj.lora_A``); the training graph's
    is the same with the wrapper's ``model.`` prefix.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    missing = [t.torch_name for t in trainables if t.torch_name not in inits]
    if missing:  # the exporter folded or merged a declared tensor: a bug, not a user error
        raise ExportError(
            f"the generation graph lost {len(missing)} adapter tensor(s), e.g. {missing[0]!r}; "
            "they were folded or deduplicated by the ONNX exporter. Please report this with the model type."
        )
    mapping: dict[str, str] = {}
    for t in trainables:
        init = inits[t.torch_name]
        if init.data_type != TensorProto.FLOAT:
            raise ExportError(f"adapter tensor {t.torch_name!r} is {TensorProto.DataType.Name(init.data_type)}; "
                              "export the model in float32.")
        graph.initializer.remove(init)
        graph.input.append(helper.make_tensor_value_info(t.torch_name, TensorProto.FLOAT, list(init.dims)))
        mapping[t.torch_name] = graph_name(t.torch_name)
    return mapping


def _info(proto: onnx.ModelProto, file: str, adapter_inputs: dict[str, str]) -> GenerationInfo:
    inputs = {i.name: i for i in proto.graph.input}
    past = [n for n in inputs if n.startswith("past_key_values.")]
    present = [o.name for o in proto.graph.output if o.name.startswith("present.")]
    num_layers = len(past) // 2
    if num_layers == 0 or len(present) != len(past):
        raise ExportError(f"the generation graph has {len(past)} past and {len(present)} present tensors; "
                          "expected one key and one value per layer. Please report this with the model type.")
    dims = inputs["past_key_values.0.key"].type.tensor_type.shape.dim  # (B, kv_heads, past, head_dim)
    return GenerationInfo(
        file=file,
        num_layers=num_layers,
        num_kv_heads=dims[1].dim_value,
        head_dim=dims[3].dim_value,
        past_inputs=[f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")],
        present_outputs=[f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")],
        adapter_inputs=adapter_inputs,
        has_position_ids="position_ids" in inputs,
    )

