"""``edgetune export``: model source -> LoRA-injected, optionally int8 -> ONNX training bundle.

The bundle is built in a temporary folder beside ``out`` and swapped into place at the end
(``atomic.replace_dir``), so a failed or killed export never leaves a half-written bundle behind
and an existing bundle (``--force``) stays at ``out`` until the new one is complete.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgetune import __version__
from edgetune.atomic import recover_dir, replace_dir
from edgetune.bundle import GraphInput, Manifest, TensorInfo, TokenizerInfo, write_manifest
from edgetune.constants import OPSET
from edgetune.errors import ExportError
from edgetune.export.artifacts import AdamWSettings
from edgetune.methods import LoraConfig, MethodConfig

QUANTIZATIONS = ("int8", "int4", "none")
COMPUTES = ("fp32", "int8")  # --compute: arithmetic of the frozen projections (export/compute_int8.py)
CLASSIFICATION = "sequence-classification"
TASKS = ("causal-lm", "dpo", CLASSIFICATION)
LEGACY_INPUTS = [  # the causal-LM graph before packing (ExportOptions.packing=False), and DPO's batch
    GraphInput("input_ids", "int64", ["batch", "sequence"]),
    GraphInput("attention_mask", "int64", ["batch", "sequence"]),
    GraphInput("labels", "int64", ["batch", "sequence"]),
]
# dpo: the reference model's summed response log-probabilities, one per row (export/dpo_graph.py)
DPO_INPUTS = [*LEGACY_INPUTS, GraphInput("ref_logps", "float32", ["batch"])]
# sequence-classification: one label index per row (export/classification_graph.py)
CLASSIFICATION_INPUTS = [*LEGACY_INPUTS[:2], GraphInput("labels", "int64", ["batch"])]
CLASSIFICATION_METHODS = ("lora", "adapter")  # methods whose layers fit an encoder (prefix sits in decoder attention)
ENCODER_LORA_TARGETS = ("query", "value")  # PEFT's default LoRA targets for BERT


def training_graph_inputs(names) -> list[GraphInput]:
    """What the manifest says the causal-LM training graph takes: every input (B, T) int64, in graph order."""
    return [GraphInput(name, "int64", ["batch", "sequence"]) for name in names]


def head_slices_obstacle(opts) -> str | None:
    """Why these export options leave no chunked, fp32-compute int8 LM head for ``--head-slices``
    (export/memory_head.py) to slice; None when there is one. ``opts``: ExportOptions' fields (quantize,
    task, memory_rewrites, loss_chunks, compute); ``export --device`` asks before choosing slices."""
    if opts.compute == "int8":
        return "--compute int8 multiplies the LM head whole (int8, no fp32 copy); --head-slices applies to fp32 compute only"
    return ("--quantize none keeps the head in fp32 (nothing to dequantize)" if opts.quantize == "none" else
            f"--task {opts.task} computes its head in one piece" if opts.task != "causal-lm" else
            "--no-memory-rewrites leaves the loss unchunked" if not opts.memory_rewrites else
            "--loss-chunks 1 leaves the loss unchunked" if opts.loss_chunks < 2 else None)


@dataclass
class ExportOptions:
    source: str | None  # HF folder, .gguf file, or built-in name (None = default model)
    out: Path
    method: str = "lora"
    method_config: MethodConfig = field(default_factory=LoraConfig)
    quantize: str = "int8"
    block_size: int = 64  # --quantize int4: input rows per scale (quantization.INT4_BLOCK_SIZES)
    task: str = "causal-lm"
    force: bool = False
    adamw: AdamWSettings = field(default_factory=AdamWSettings)
    recompute: str = "cheap"  # activation recompute per residual block (memory.RECOMPUTE_POLICIES)
    loss_chunks: int = 8  # the LM head + loss over label positions in this many chunks (1: one piece)
    memory_rewrites: bool = True  # False: the graphs exactly as ORT's gradient builder makes them
    beta: float | None = None  # dpo: strength of the KL penalty towards the reference (default 0.1)
    packing: bool = True  # False: the older graph (0/1 mask, no position_ids input) that cannot take packed rows
    num_labels: int | None = None  # sequence-classification: how many classes (default: len(labels))
    labels: tuple[str, ...] | None = None  # sequence-classification: class names (default LABEL_0, LABEL_1, ...)
    compute: str = "fp32"  # int8: frozen projections as int8 GEMMs on the int8 weights (changes numbers; opt-in)
    head_slices: int | None = None  # the LM head's products in vocabulary slices (None: auto; 0: off; memory_head.py)

    def __post_init__(self) -> None:
        from edgetune.export.memory import RECOMPUTE_POLICIES

        self.out = Path(self.out)
        if self.recompute not in RECOMPUTE_POLICIES:
            raise ExportError(f"unsupported --recompute {self.recompute!r}; choose one of: {', '.join(RECOMPUTE_POLICIES)}.")
        if not 1 <= self.loss_chunks <= 256:
            raise ExportError(f"--loss-chunks must be between 1 and 256, got {self.loss_chunks}.")
        if self.quantize not in QUANTIZATIONS:
            raise ExportError(f"unsupported quantization {self.quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}.")
        from edgetune.methods import get_method
        from edgetune.quantization import INT4_BLOCK_SIZES

        if self.quantize == "int4" and self.task != "causal-lm":
            raise ExportError(f"--quantize int4 is available for --task causal-lm only, got --task {self.task}; "
                              "use --quantize int8.")
        if self.block_size not in INT4_BLOCK_SIZES:
            raise ExportError(f"--block-size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, got {self.block_size}.")
        refusal = get_method(self.method).quantized_base
        if self.quantize != "none" and refusal:  # e.g. full fine-tuning trains every weight in fp32
            raise ExportError(f"{refusal} (got --quantize {self.quantize}).")
        if self.compute not in COMPUTES:
            raise ExportError(f"unsupported --compute {self.compute!r}; choose one of: {', '.join(COMPUTES)}.")
        if self.compute == "int8" and self.quantize != "int8":
            raise ExportError(f"--compute int8 multiplies int8 weights and needs --quantize int8, got --quantize "
                              f"{self.quantize}; use --quantize int8 or --compute fp32.")
        if self.compute == "int8" and self.task != "causal-lm":
            raise ExportError(f"--compute int8 is available for --task causal-lm only, got --task {self.task}; "
                              "use --compute fp32.")
        if self.compute == "int8" and not self.memory_rewrites:
            raise ExportError("--compute int8 rewrites the memory plan's per-use dequantizations and cannot be "
                              "combined with --no-memory-rewrites; drop one of the two.")
        if self.head_slices is not None and not 0 <= self.head_slices <= 4096:
            raise ExportError(f"--head-slices must be auto or between 0 and 4096, got {self.head_slices}.")
        if self.compute == "int8" and self.head_slices:
            raise ExportError(f"{head_slices_obstacle(self)}: drop --head-slices or use --compute fp32.")
        if self.head_slices and self.head_slices > 1 and head_slices_obstacle(self):
            raise ExportError(f"--head-slices {self.head_slices} splits the int8 LM head of the chunked causal-LM "
                              f"loss, but {head_slices_obstacle(self)}; drop --head-slices.")
        if self.task not in TASKS:
            raise ExportError(f"unsupported task {self.task!r}; choose one of: {', '.join(TASKS)}.")
        if self.beta is not None and self.task != "dpo":
            raise ExportError(f"--beta applies to --task dpo only, not {self.task}.")
        self._check_classification()
        if self.task == "dpo":
            self.beta = 0.1 if self.beta is None else self.beta
            if not 0 < self.beta <= 100:
                raise ExportError(f"--beta must be in (0, 100], got {self.beta}.")


    def _check_classification(self) -> None:
        """--num-labels / --labels: only with sequence-classification, which needs them and a fitting method."""
        if self.task != CLASSIFICATION:
            if self.num_labels is not None or self.labels is not None:
                raise ExportError(f"--num-labels and --labels apply to --task {CLASSIFICATION} only, not {self.task}.")
            return
        import dataclasses

        if self.method not in CLASSIFICATION_METHODS:
            raise ExportError(f"--method {self.method} is not available for --task {CLASSIFICATION} (edgetune "
                              f"builds it for decoder blocks only); use --method {' or '.join(CLASSIFICATION_METHODS)}.")
        labels = tuple(self.labels) if self.labels is not None else None
        problems = []
        if labels is not None:
            if any(not isinstance(x, str) or not x.strip() for x in labels):
                problems.append(f"--labels must be non-empty names separated by commas, got {','.join(map(str, labels))!r}")
            elif len(set(labels)) != len(labels):
                problems.append(f"--labels must be distinct, got {','.join(labels)!r}")
            if self.num_labels is not None and self.num_labels != len(labels):
                problems.append(f"--num-labels {self.num_labels} but --labels names {len(labels)}")
        n = self.num_labels if self.num_labels is not None else (len(labels) if labels else None)
        if n is None:
            problems.append("give --num-labels N (2 or more) or --labels a,b,c")
        elif not isinstance(n, int) or n < 2:
            problems.append(f"--num-labels must be at least 2, got {n!r}")
        if problems:
            raise ExportError(f"--task {CLASSIFICATION}: " + "; ".join(problems) + ".")
        self.num_labels = n
        self.labels = labels or tuple(f"LABEL_{i}" for i in range(n))  # transformers' default id2label names
        if self.method == "lora" and tuple(self.method_config.targets) == type(self.method_config)().targets:
            # the decoder default (q_proj, v_proj) names no BERT layer; PEFT's BERT default instead
            self.method_config = dataclasses.replace(self.method_config, targets=ENCODER_LORA_TARGETS)


def check_output(out: Path, force: bool) -> None:
    recover_dir(out)  # a bundle set aside by an export killed mid-swap is put back first
    if out.exists() and not force:
        raise ExportError(f"output folder {str(out)!r} already exists; pass --force to replace it or choose another --out.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {str(out)!r} exists and is not a folder; choose another --out.")


def export_bundle(opts: ExportOptions, report: Callable[[str], None] = lambda msg: None) -> Manifest:
    """Run the whole export; ``report`` receives one line per stage (the CLI prints them)."""
    from edgetune.export.methods import get_method
    from edgetune.export.sources import load_encoder_classifier, load_model, resolve_source

    check_output(opts.out, opts.force)
    method = get_method(opts.method)
    source = resolve_source(opts.source)  # fails fast on a bad path, before loading anything
    t0 = time.perf_counter()
    report(f"hashing base weights of {source.model_id}")
    base_sha = source.sha256()
    report(f"loading {source.model_id} ({source.kind})")
    if opts.task == CLASSIFICATION:
        model, tokenizer = load_encoder_classifier(source, opts.num_labels, getattr(opts.method_config, "seed", 0))
    else:
        model, tokenizer = load_model(source)
    if hasattr(method, "resolve_config"):  # a method whose config depends on the model (e.g. its width)
        opts.method_config = method.resolve_config(model, opts.method_config)
    # before the method adds or unfreezes any; a classifier's new head is not part of the base
    base_parameters = sum(p.numel() for n, p in model.named_parameters()
                          if not (opts.task == CLASSIFICATION and n.split(".")[0] == "classifier"))
    trainables = method.inject(model, opts.method_config)
    if opts.task == CLASSIFICATION:  # the head trains whole, beside the method's tensors (PEFT: modules_to_save)
        trainables += classification_head(model)
    fixed = method.fixed(model, opts.method_config) if hasattr(method, "fixed") else []  # e.g. FFA-LoRA's A
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.", suffix=".partial", dir=opts.out.parent))
    try:
        manifest = _build(opts, method, model, tokenizer, trainables, fixed, source, base_sha, base_parameters, tmp,
                          report)
        replace_dir(tmp, opts.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest.producer["export_seconds"] = round(time.perf_counter() - t0, 1)
    return manifest


def _build(opts, method, model, tokenizer, trainables, fixed, source, base_sha, base_parameters: int, tmp: Path,
           report) -> Manifest:
    import onnx
    from onnx import numpy_helper

    from edgetune.export import artifacts
    from edgetune.export.graph_cleanup import expose_layer_norm_statistics, remove_zero_dropout
    from edgetune.export.memory import optimize_artifacts
    from edgetune.export.memory_loss import chunk_loss
    from edgetune.export.quantize import quantize_graph
    from edgetune.export.quantize_int4 import EXPORT_OPSET, linear_weights, quantize_graph_int4, restamp
    from edgetune.export.tokenizer_info import save_tokenizer
    from edgetune.export.training_graph import OUTPUT_NAMES, export_training_graph, graph_name

    int4 = opts.quantize == "int4"
    # Its own folder: over 2 GB of weights the TorchScript exporter writes one external-data file
    # per tensor beside the graph, which must not end up in the bundle.
    with tempfile.TemporaryDirectory(prefix=".training.", dir=tmp) as raw:
        full = Path(raw) / "full_model.onnx"
        if opts.task == CLASSIFICATION:
            from edgetune.export.classification_graph import export_classification_graph

            report(f"exporting the training graph (mean pooling, linear head of {opts.num_labels} labels, cross-entropy)")
            input_names = export_classification_graph(model, full)
        elif opts.task == "dpo":
            from edgetune.export.dpo_graph import export_dpo_graph

            report(f"exporting the training graph (DPO loss, beta {opts.beta})")
            export_dpo_graph(model, full, opts.beta)
            input_names = [i.name for i in DPO_INPUTS]
        else:
            report("exporting the training graph (causal-LM loss)")
            from edgetune.methods import get_method as method_spec

            packing = opts.packing and method_spec(opts.method).packs
            input_names = export_training_graph(model, full, opset=EXPORT_OPSET if int4 else OPSET, packing=packing)
        graph = onnx.load(str(full))  # external data too, if torch wrote any
    if int4:
        restamp(graph)
    remove_zero_dropout(graph)
    expose_layer_norm_statistics(graph)  # encoders (BERT) use LayerNormalization; its gradient needs them
    trainable_names = [graph_name(t.torch_name) for t in trainables]
    fixed_keys = {graph_name(t.torch_name): t.peft_key for t in fixed}  # frozen adapter tensors: exact fp32
    # Shapes only: a reference to an initializer the quantizer removes would keep its fp32 values
    # alive to the end of the export (the whole base, 4.9 GB for a 1B model).
    params = {t.name: list(t.dims) for t in graph.graph.initializer}
    missing = [n for n in trainable_names if n not in params]
    if missing:  # a declared tensor the exporter did not keep by name: a bug, not a user error
        raise RuntimeError(f"trainable tensors missing from the exported graph: {missing[:3]}")
    quantized, quantized4, int4_tensors = set(), set(), []
    fixed_values = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer if t.name in fixed_keys}
    names = [t.name for t in graph.graph.initializer if t.name not in trainable_names and t.name not in fixed_keys
             and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT]
    if int4:
        report(f"quantizing frozen linear weights to int4 (blocks of {opts.block_size}); the embedding to int8")
        quantized4 = set(linear_weights(graph, names))
        int4_tensors = quantize_graph_int4(graph, [n for n in names if n in quantized4], opts.block_size)
        names = [n for n in names if n not in quantized4]
    if opts.quantize in ("int8", "int4"):
        if not int4:
            report("quantizing frozen weights to int8 (per output channel)")
        quantized = {q.name for q in quantize_graph(graph, names)}
    # The loss is chunked in the forward graph, before gradients exist. Only the causal-LM loss (a
    # mean SoftmaxCrossEntropyLoss) matches. DPO's loss is a non-linear function of whole-row sums,
    # so a chunk's backward needs every chunk's forward first; chunk k's (rows, vocab) log-probs
    # cannot be freed before chunk k+1 starts (ordering them makes a cycle, checked) and chunking
    # would save nothing. DPO runs its LM head over the reply positions in one piece.
    # A classifier's loss is over (B, labels) logits: nothing to chunk.
    chunk = opts.memory_rewrites and opts.task != CLASSIFICATION
    loss_chunks = chunk_loss(graph, OUTPUT_NAMES[0], opts.loss_chunks) if chunk else 0
    # INT4 tensors stay constants of the graphs: an ORT checkpoint cannot hold them
    frozen_inits = [t for t in graph.graph.initializer if t.name not in trainable_names and t.name not in int4_tensors]
    report("generating ONNX Runtime training artifacts (gradient graph, AdamW, checkpoint)")
    artifacts.generate(graph, trainable_names, [t.name for t in frozen_inits], tmp, opts.adamw)
    memory = None
    if opts.memory_rewrites:
        report(f"planning memory (recompute: {opts.recompute}, loss chunks: {loss_chunks or 'off'})")
        head_slices = 0 if opts.compute == "int8" else opts.head_slices  # int8 compute: compute_int8.py's head
        memory = optimize_artifacts(tmp, OUTPUT_NAMES[0], opts.recompute, head_slices).to_dict(opts.recompute)
    compute = {"matmul": "fp32"}
    if opts.compute == "int8":
        from edgetune.export.compute_int8 import rewrite_artifacts

        report("frozen projections as int8 GEMMs on the int8 weights (activations and gradients quantized per row)")
        compute = rewrite_artifacts(tmp).to_dict()
    if int4:  # the training and eval graphs (and the portable ones after them) share one copy of the INT4 weights
        from edgetune.export.quantize_int4 import share_int4_weights

        share_int4_weights(tmp)
    from edgetune.export.portable import export_portable  # after the memory plan: same graph, stock operators

    inputs = (DPO_INPUTS if opts.task == "dpo" else CLASSIFICATION_INPUTS if opts.task == CLASSIFICATION
              else training_graph_inputs(input_names))
    portable = export_portable(tmp, trainable_names, report, batch_inputs=tuple(i.name for i in inputs))
    generation, task_config = None, {"beta": opts.beta} if opts.task == "dpo" else {}
    if opts.task == CLASSIFICATION:
        from edgetune.export.classification_graph import HEAD, LOGITS, export_logits_graph

        report("exporting the logits graph (stock onnxruntime; the adapter and head as inputs)")
        export_logits_graph(model, [t.torch_name for t in trainables], tmp / "classifier_model.onnx",
                            quantize=opts.quantize != "none")
        task_config = {"labels": list(opts.labels), "pooling": "mean", "head": HEAD, "logits": LOGITS,
                       "head_tensors": [graph_name(t.torch_name) for t in trainables if t.module_path == HEAD]}
    else:
        generation = _generation_graph(opts, method, model, trainables, fixed, tmp, report)
    tokenizer_info = save_tokenizer(tokenizer, model, tmp)
    return _manifest(opts, method, model, graph, params, trainables, trainable_names, fixed, fixed_keys, quantized,
                     quantized4, int4, inputs, generation, tokenizer_info, source, base_sha, base_parameters, memory,
                     portable, task_config, tmp, compute, fixed_values)


def classification_head(model) -> list:
    """The head's weight and bias as trainable tensors (keys as PEFT saves modules_to_save)."""
    from edgetune.export.classification_graph import HEAD
    from edgetune.export.methods import Trainable

    head = getattr(model, HEAD)
    for p in head.parameters():
        p.requires_grad_(True)
    return [Trainable(HEAD, attr, f"base_model.model.{HEAD}.{attr}") for attr in ("weight", "bias")]


def _generation_graph(opts, method, model, trainables, fixed, tmp: Path, report):
    from edgetune.export.generation_graph import export_generation_graph

    report("exporting the generation graph (key/value cache, adapter as inputs)")
    # int4 bundles generate from the same int4 blocks as training, read by com.microsoft MatMulNBits
    # (optimum exports the KV-cache graph at opset 17, which cannot be re-stamped to the opset 21 that
    # block-wise DequantizeLinear needs; MatMulNBits needs neither).
    # Fixed adapter tensors are generation inputs like the trained ones (fed from the bundle on the device).
    # A method may trace a different view of the model for generation (prefix: the base decoder, its
    # tensors arriving as the initial cache); by default every adapter tensor becomes a graph input.
    view = getattr(method, "generation_view", None)
    adapter_tensors = trainables + fixed
    with view(model, adapter_tensors) if view else contextlib.nullcontext(adapter_tensors) as generation_inputs:
        return export_generation_graph(model, generation_inputs, tmp / "generation_model.onnx",
                                       quantize=opts.quantize != "none",
                                       int4_block_size=opts.block_size if opts.quantize == "int4" else None)


def _manifest(opts, method, model, graph, params, trainables, trainable_names, fixed, fixed_keys, quantized,
              quantized4, int4, inputs, generation, tokenizer_info, source, base_sha, base_parameters, memory,
              portable, task_config, tmp: Path, compute: dict, fixed_values: dict) -> Manifest:
    import onnx

    from edgetune.export.quantize_int4 import INT4_OPSET
    from edgetune.export.training_graph import OUTPUT_NAMES, graph_name
    from edgetune.quantization import INT4_SCHEME, INT8_SCHEME

    peft_config = method.peft_config(opts.method_config, source.model_id)
    if opts.task == CLASSIFICATION:  # e.g. PEFT's sequence classification: the head saved whole beside the adapter
        from edgetune.methods import get_method as method_spec

        peft_config = method_spec(opts.method).task_peft_config(peft_config, opts.task, task_config["head"])

    shape = {t.name: list(t.dims) for t in graph.graph.initializer}
    dtype = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in graph.graph.initializer}
    # The frozen list names the ORIGINAL fp32 tensors (as the model knows them) and how each is stored.
    scheme = {**{n: INT8_SCHEME for n in quantized}, **{n: INT4_SCHEME.format(block_size=opts.block_size) for n in quantized4}}
    frozen = [TensorInfo(n, params[n], "float32", quantization=scheme.get(n, "none"))
              for n in params if n not in trainable_names]
    if fixed:  # a frozen tensor with a PEFT key is a fixed adapter tensor; its exact values go beside it
        from edgetune.fixed_adapter import write_fixed

        for t in frozen:
            t.peft_key = fixed_keys.get(t.graph_name)
        write_fixed(tmp, fixed_values)
    config = model.config
    manifest = Manifest(
        base_model={
            "id": source.model_id, "sha256": base_sha, "model_type": config.model_type, "source": source.kind,
            "config": {k: getattr(config, k, None) for k in
                       ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size", "tie_word_embeddings")},
            "parameters": base_parameters,
        },
        task=opts.task,
        method={"name": method.name, "config": opts.method_config.to_dict(),
                "peft_config": peft_config},
        optimizer=opts.adamw.to_dict(),
        trainable=[TensorInfo(graph_name(t.torch_name), shape[graph_name(t.torch_name)], dtype[graph_name(t.torch_name)], t.peft_key)
                   for t in trainables],
        frozen=frozen,
        quantization=opts.quantize,
        inputs=inputs,
        outputs=list(OUTPUT_NAMES),
        tokenizer=tokenizer_info,
        generation=generation,
        producer={"edgetune": __version__, "opset": INT4_OPSET if int4 else OPSET, "memory": memory,
                  "compute": compute},
        portable=portable,
        task_config=task_config,
    )
    write_manifest(tmp, manifest)
    return manifest

