"""``bench/run.py --grid``: how step time and peak RSS grow with batch and sequence length.

For every (batch, sequence) cell both trainers run in fresh processes on the fixed random batch
(bench/data.py), with the same bundle, threads and AdamW as the main comparison, so each cell's
peak RSS is that configuration's alone.
"""

from __future__ import annotations

import statistics

from bench.spawn import ChildFailed, worker
from bench.table import NAMES

GB = 1e9


def parse_sizes(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"bench: {option} must be positive integers separated by commas, got {text!r}.")
    return values


def run_grid(args, bundle, torch_args: dict | None, say) -> list[dict]:
    """One cell per (batch, seq): step time median and peak RSS for each trainer (None when it failed)."""
    cells = []
    for batch in parse_sizes(args.grid_batches, "--grid-batches"):
        for seq in parse_sizes(args.grid_seqs, "--grid-seqs"):
            common = {"batch": batch, "seq": seq, "threads": args.threads, "steps": args.steps,
                      "warmup": args.warmup, "prompt_fraction": args.prompt_fraction}
            cell = {"batch": batch, "seq": seq, "trainers": {}}
            jobs = {"edgetune": ("edgetune", {**common, "bundle": str(bundle)})}
            if torch_args is not None:
                jobs["pytorch_peft"] = ("torch", {**common, **torch_args})
            for name, (kind, job) in jobs.items():
                say(f"grid {batch} x {seq}: {NAMES[name]}")
                try:
                    r = worker(kind, job)
                except ChildFailed as exc:  # e.g. out of memory: record it, keep the rest of the grid
                    cell["trainers"][name] = {"error": str(exc).splitlines()[0]}
                    continue
                before = r["rss_before_steps_bytes"]
                hw = r.get("steps_high_water_bytes")
                cell["trainers"][name] = {
                    "step_s": statistics.median(r["times"]), "step_times_s": r["times"],
                    "tokens_per_s": batch * seq / statistics.median(r["times"]),
                    "peak_rss_bytes": r["peak_rss_bytes"], "steps_peak_growth_bytes": None if hw is None else hw - before,
                    "other_cores": r["other_cores"],
                }
            cells.append(cell)
    return cells


def render_grid(cells: list[dict]) -> str:
    names = [n for n in NAMES if any(n in c["trainers"] for c in cells)]
    head = (f"{'batch x seq':<12}" + "".join(f"{NAMES[n] + ' step s':>20}{NAMES[n] + ' peak RSS':>22}" for n in names)
            + ("".join(f"{'speed-up':>10}{'RSS ratio':>11}") if len(names) == 2 else ""))
    lines = [head]
    for c in cells:
        t = c["trainers"]
        row = f"{c['batch']} x {c['seq']:<8}"
        for n in names:
            r = t.get(n, {})
            if "error" in r or not r:
                row += f"{'failed':>20}{'':>22}"
            else:
                row += f"{r['step_s']:>20.3f}{r['peak_rss_bytes'] / GB:>19.2f} GB"
        if len(names) == 2 and all("step_s" in t.get(n, {}) for n in names):
            e, p = t[names[0]], t[names[1]]
            row += f"{p['step_s'] / e['step_s']:>9.2f}x{e['peak_rss_bytes'] / p['peak_rss_bytes']:>10.2f}x"
        lines.append(row)
    return "\n".join(lines)
