"""Benchmark workers; each runs in its own process so the OS measures its memory alone.

    python bench/workers.py edgetune '{"bundle": ..., "backend": "portable", "batch": 4, "seq": 128, "threads": 2, ...}'
    python bench/workers.py torch    '{"model": null, "lora": {...}, "adamw": {...}, ...}'
    python bench/workers.py gemm     '{"threads": 2, "n": 2048, "runs": 10, "kind": "fp32|int8|int8-dynamic"}'

With ``"data": PATH`` (and ``examples``, ``max_seq_len``) the edgetune and torch workers train on
real instruction data instead of the fixed random batch: edgetune packed, PyTorch+PEFT padded to
the longest example of each step's group (bench/realdata.py).

Each prints one line ``RESULT {json}``: step times, losses, RSS before the first step, after the
warm-up and after the timed steps (psutil), and the kernel's peak RSS of the loading phase and
of the training phase (bench/memory.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` and the repo's `edgetune`

from bench import memory, realdata  # noqa: E402
from bench.cpu import Window  # noqa: E402
from bench.data import make_batch  # noqa: E402

LEARNING_RATE = 1e-4


def timed(step, steps: int, losses: list) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return times


def measure(step, warmup: int, steps: int) -> dict:
    """Run ``warmup`` then ``steps`` calls of ``step()`` (which returns the loss); time the latter."""
    before = memory.rss()
    load_high_water = memory.high_water()
    reset = memory.reset_high_water()
    losses = [step() for _ in range(warmup)]
    after_warmup = memory.rss()
    with Window() as window:
        times = timed(step, steps, losses)
    return {
        "times": times, "losses": losses, **window.result(),
        "rss_before_steps_bytes": before, "rss_after_warmup_bytes": after_warmup, "rss_after_steps_bytes": memory.rss(),
        "load_high_water_bytes": load_high_water,
        "steps_high_water_bytes": memory.high_water() if reset else None,  # warm-up included
    }


def run_edgetune(a: dict) -> dict:
    from edgetune.bundle import Bundle
    from edgetune.runtime.backend import open_backend

    bundle = Bundle.open(a["bundle"], verify=False)
    manifest = bundle.manifest
    backend = open_backend(a.get("backend", "ort-training"), bundle, threads=a["threads"])

    def step_on(batch) -> float:
        loss = backend.train_step(batch)
        backend.optimizer_step(LEARNING_RATE)
        return loss

    if a.get("data"):
        batches = realdata.edgetune_batches(a)
        step, counts = realdata.stepper(batches, step_on), realdata.token_counts(batches)
    else:
        data = make_batch(manifest.base_model["config"]["vocab_size"], a["batch"], a["seq"], a["prompt_fraction"])
        step, counts = (lambda: step_on(data)), {}
    result = {**measure(step, a["warmup"], a["steps"]), **counts}
    result["torch_imported"] = "torch" in sys.modules  # the device half must not carry torch's memory
    return result


def run_torch(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgetune.export.sources import resolve_source

    # As edgetune's exporter loads it (edgetune/export/sources.py), without the tokenizer and the
    # ONNX-export checks, which would only add to this process's memory.
    source = resolve_source(a["model"])
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.folder, attn_implementation="eager", dtype=torch.float32,
                                                 use_cache=False, **kwargs)
    lora = a["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=list(lora["targets"]),
                                             lora_dropout=0.0, use_rslora=lora.get("use_rslora", False),
                                             task_type="CAUSAL_LM"))
    model.train()
    adamw = a["adamw"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                            betas=tuple(adamw["betas"]), eps=adamw["eps"], weight_decay=adamw["weight_decay"])
    def step_on(data) -> float:
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def tensors(batch):
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    if a.get("data"):
        batches = realdata.padded_batches(a)
        step, counts = realdata.stepper([tensors(b) for b in batches], step_on), realdata.token_counts(batches)
    else:
        data = tensors(make_batch(model.config.vocab_size, a["batch"], a["seq"], a["prompt_fraction"]))
        step, counts = (lambda: step_on(data)), {}
    result = {**measure(step, a["warmup"], a["steps"]), **counts}
    result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


GEMM_KINDS = {  # kind -> the ONNX Runtime operator timed
    "fp32": "MatMul",
    "int8": "MatMulInteger",  # uint8 activations x int8 weights -> int32
    "int8-dynamic": "DynamicQuantizeMatMul",  # fp32 activations quantized per tensor on the fly x int8 weights -> fp32
}


def gemm_model(kind: str, n: int):
    """An n x n @ n x n product as one ONNX node; weights (the right operand) are initializers when int8."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "fp32":
        nodes = [helper.make_node("MatMul", ["a", "b"], ["c"])]
        inputs, inits, out = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"], [], TensorProto.FLOAT
    else:
        weight = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "b")
        if kind == "int8":
            nodes = [helper.make_node("MatMulInteger", ["a", "b"], ["c"])]
            inputs, out = [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])], TensorProto.INT32
            inits = [weight]
        else:
            nodes = [helper.make_node("DynamicQuantizeMatMul", ["a", "b", "b_scale", "b_zero"], ["c"], domain="com.microsoft")]
            inputs, out = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])], TensorProto.FLOAT
            inits = [weight, numpy_helper.from_array(np.full(n, 0.01, np.float32), "b_scale"),
                     numpy_helper.from_array(np.zeros(n, np.int8), "b_zero")]
    graph = helper.make_graph(nodes, "gemm", inputs, [helper.make_tensor_value_info("c", out, [n, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    feeds = {"a": rng.random((n, n), dtype=np.float32)} if kind != "int8" else {"a": rng.integers(0, 256, (n, n), dtype=np.uint8)}
    if kind == "fp32":
        feeds["b"] = rng.random((n, n), dtype=np.float32)
    return model, feeds


def run_gemm(a: dict) -> dict:
    """An n x n @ n x n product in a plain ONNX Runtime session: the machine's reachable GEMM rate.

    ``kind`` fp32 (MatMul), int8 (MatMulInteger) or int8-dynamic (DynamicQuantizeMatMul, the
    quantization of the fp32 activations included). 2 n^3 operations either way.
    """
    from edgetune.runtime.session_options import training_options
    from edgetune.runtime.ort_import import onnxruntime

    ort = onnxruntime()
    kind = a.get("kind", "fp32")
    model, feeds = gemm_model(kind, a["n"])
    # The same threading as the ort-training backend's sessions.
    session = ort.InferenceSession(model.SerializeToString(), training_options(a["threads"]),
                                   providers=["CPUExecutionProvider"])
    for _ in range(2):  # warm-up
        session.run(None, feeds)
    with Window() as window:
        times = timed(lambda: session.run(None, feeds), a["runs"], [])
    return {"kind": kind, "op": GEMM_KINDS[kind], "times": times, "flop": 2 * a["n"] ** 3, **window.result()}


WORKERS = {"edgetune": run_edgetune, "torch": run_torch, "gemm": run_gemm}

if __name__ == "__main__":
    kind, args = sys.argv[1], json.loads(sys.argv[2])
    print("RESULT " + json.dumps(WORKERS[kind](args)), flush=True)
