"""The printed report: one table of edgetune vs PyTorch+PEFT, then the GEMM, FLOP, export and delta facts."""

from __future__ import annotations

from edgetune.summary import memory_plan_text

NAMES = {"edgetune": "edgetune", "edgetune_portable": "portable", "edgetune_int8": "int8 compute",
         "pytorch_peft": "PyTorch+PEFT"}
# ratio columns: (header, numerator trainer, denominator trainer), shown when both ran
RATIOS = [("edgetune/PyTorch", "edgetune", "pytorch_peft"), ("portable/ort-tr.", "edgetune_portable", "edgetune"),
          ("int8/fp32 compute", "edgetune_int8", "edgetune")]
GB, MB = 1e9, 1e6


def _gb(x):
    return "—" if x is None else f"{x / GB:.2f} GB"


def _signed_gb(x):
    return "—" if x is None else f"{x / GB:+.2f} GB"


def _ratio(a, b):
    return "" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


# (label, key, format, ratio?) ; "edgetune" is the ort-training backend, "portable" the stock-package one
ROWS = [
    ("step time, median s", "step_s", lambda x: f"{x:.3f}", "portable"),
    ("  fastest – slowest s", None, None, False),
    ("tokens/s", "tokens_per_s", lambda x: f"{x:.0f}", True),
    ("useful GFLOP/s", "useful_gflop_per_s", lambda x: f"{x:.0f}", True),
    ("  of the GEMM rate", "fraction_of_gemm", lambda x: f"{100 * x:.0f}%", False),
    ("cores kept busy in steps", "cores_busy", lambda x: f"{x:.2f}", False),
    ("  cores others took meanwhile", "other_cores", lambda x: f"{x:.2f}", False),
    ("loss at step 1", "first_loss", lambda x: f"{x:.4f}", False),
    ("peak RSS, whole process (OS)", "peak_rss_bytes", _gb, True),
    ("RSS when training starts", "rss_before_steps_bytes", _gb, True),
    ("RSS growth after warm-up", "rss_growth_after_warmup_bytes", _signed_gb, True),
    ("peak RSS growth during steps", "steps_peak_growth_bytes", _signed_gb, True),
]


def render(r: dict) -> str:
    c, m = r["config"], r["machine"]
    trainers = r["trainers"]
    names = [n for n in NAMES if n in trainers]
    ratio_cols = [(h, a, b) for h, a, b in RATIOS if a in trainers and b in trainers]
    head = [
        f"edgetune vs PyTorch+PEFT — {c['model']}, {c['method']}, AdamW lr {c['learning_rate']:g}",
        f"batch {c['batch_size']} x {c['seq_len']} tokens, prompt fraction {c['prompt_fraction']:g} "
        f"({r['flops']['label_positions']} label positions); {m['threads']} threads; edgetune base {'fp32' if c['quantize'] == 'none' else c['quantize']}",
        # a result file written before the plan was recorded has no "memory_plan" key
        f"edgetune memory plan {memory_plan_text({'memory': c['memory_plan']} if 'memory_plan' in c else {})}",
        f"{m['cpu']}, {m['cores']} cores, load average at start {m['load_average_at_start'][0]}; "
        f"median of {c['steps']} steps after {c['warmup']} warm-up",
        # results written before the features were recorded have no "simd" key
        f"CPU SIMD features: {', '.join(m['simd']) if m.get('simd') else 'not recorded'}",
        gemm_line(r),
        "",
    ]
    width = 30
    lines = [f"{'':<{width}}" + "".join(f"{NAMES[n]:>15}" for n in names)
             + "".join(f"{h:>18}" for h, _, _ in ratio_cols)]
    for label, key, fmt, ratio in ROWS:
        if key is None:
            cells = [f"{trainers[n]['step_min_s']:.2f} – {trainers[n]['step_max_s']:.2f}" for n in names]
        else:
            cells = [fmt(trainers[n][key]) if trainers[n].get(key) is not None else "—" for n in names]
        row = f"{label:<{width}}" + "".join(f"{cell:>15}" for cell in cells)
        for _, a, b in ratio_cols:
            # step time only makes sense as portable vs ort-training (the PyTorch column shows tokens/s)
            shown = ratio is True or (ratio == "portable" and a in ("edgetune_portable", "edgetune_int8"))
            row += f"{_ratio(trainers[a].get(key), trainers[b].get(key)) if shown else '':>18}"
        lines.append(row)
    f = r["flops"]
    tail = real_data_lines(r) + [
        "",
        f"GEMM: {r['gemm']['n']}^3 fp32 MatMul in ONNX Runtime, {m['threads']} threads: "
        f"{r['gemm']['gflop_per_s']:.0f} GFLOP/s (the faster of "
        + " and ".join(f"{x:.0f}" for x in r["gemm"]["gflop_per_s_before_after"])
        + f", before and after the trainers; median of {r['gemm']['runs']} runs each)",
        f"useful work per step: {f['total'] / 1e9:.1f} GFLOP = 2 x forward {f['forward'] / 1e9:.1f} "
        f"(projections {f['projections'] / 1e9:.1f} + LM head {f['lm_head'] / 1e9:.1f} + attention {f['attention'] / 1e9:.1f})",
        f"  {f['formula']}",
    ]
    e = r["export"]
    how = "reused" if e["seconds"] is None else f"exported in {e['seconds']:.0f} s (peak RSS {_gb(e['peak_rss_bytes'])})"
    tail.append(f"bundle: {r['bundle']['total'] / MB:.1f} MB on disk, {how}")
    d = r["delta"]
    base = r["base_model_bytes_fp32"]
    for kind, label in (("payload", "values only"), ("file", ".etd file")):
        sizes = [(codec, d[kind][codec]) for codec in ("fp32", "fp16", "int8") if d[kind].get(codec) is not None]
        if sizes:
            tail.append(f"delta ({label}): " + ", ".join(f"{codec} {n / MB:.2f} MB ({100 * n / base:.2f}%)" for codec, n in sizes)
                        + f"  — % of the fp32 base model, {base / MB:.0f} MB")
    tail.append(f"  {d['tensors']} trainable tensors, {d['values']:,} values")
    p = r.get("portable_vs_ort_training")
    if p:
        tail += ["", f"portable backend (stock onnxruntime InferenceSession, AdamW in numpy) vs ort-training: "
                     f"{p['step_time_ratio']:.2f}x the step time, {p['peak_rss_ratio']:.2f}x the peak RSS (goal: at most 1.25x each)"]
    if r.get("ratios"):
        s = r["ratios"]
        tail += ["", f"edgetune vs PyTorch+PEFT: {s['speedup_tokens_per_s']:.2f}x the tokens/s, "
                     f"{s['peak_rss_ratio']:.2f}x the peak RSS"
                     + (f", {s['steps_peak_growth_ratio']:.2f}x the peak RSS growth during steps"
                        if s.get("steps_peak_growth_ratio") is not None else "")]
    tail += [f"WARNING: {w} Timings are not comparable; run again on a quiet machine." for w in r["warnings"]]
    return "\n".join(head + lines + tail)


def gemm_line(r: dict) -> str:
    """The limits each ratio is read against: fp32 and int8 GEMM rates of this run."""
    parts = [f"fp32 MatMul {r['gemm']['gflop_per_s']:.0f} GFLOP/s"]
    parts += [f"int8 {g['op']} {g['gop_per_s']:.0f} GOP/s ({g['gop_per_s'] / r['gemm']['gflop_per_s']:.2f}x)"
              for g in (r.get("gemm_int8") or {}).values()]
    return f"GEMM rates ({r['gemm']['n']}^3, ONNX Runtime): " + "; ".join(parts)


def real_data_lines(r: dict) -> list[str]:
    """The second table: real instruction data, edgetune packed vs PyTorch+PEFT padded."""
    d = r.get("real_data")
    if not d:
        return []
    trainers = d["trainers"]
    names = list(trainers)
    both = "edgetune" in trainers and "pytorch_peft" in trainers  # the ratio column (an int8 column may sit between)
    width = 30
    out = ["", f"real data: {d['data']}, {d['examples_per_step']} examples a step (the same for both), "
               f"{d['steps']} timed steps after {d['warmup']} warm-up; edgetune packs rows of {d['max_seq_len']} tokens, "
               "PyTorch+PEFT pads each step to its longest example",
           f"{'':<{width}}" + "".join(f"{NAMES[n]:>15}" for n in names) + (f"{'edgetune/PyTorch':>18}" if both else "")]
    rows = [("useful tokens/s", "useful_tokens_per_s", lambda x: f"{x:.0f}", True),
            ("step time, median s", "step_s", lambda x: f"{x:.3f}", False),
            ("real tokens / row tokens", "efficiency", lambda x: f"{100 * x:.1f}%", False),
            ("loss at step 1", "first_loss", lambda x: f"{x:.4f}", False),
            ("peak RSS, whole process (OS)", "peak_rss_bytes", _gb, True),
            ("  cores others took meanwhile", "other_cores", lambda x: "—" if x is None else f"{x:.2f}", False)]
    for label, key, fmt, ratio in rows:
        row = f"{label:<{width}}" + "".join(f"{fmt(trainers[n][key]):>15}" for n in names)
        if ratio and both:
            row += f"{_ratio(trainers['edgetune'][key], trainers['pytorch_peft'][key]):>18}"
        out.append(row)
    shapes = {n: sorted({tuple(s) for s in trainers[n]["shapes"]}) for n in names}
    out.append("batch shapes (rows x tokens): " + "; ".join(
        f"{NAMES[n]} " + ", ".join(f"{a}x{b}" for a, b in shapes[n]) for n in names))
    return out
