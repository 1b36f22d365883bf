"""The on-device training loop: data -> batches -> backend steps -> crash-safe checkpoints.

Resuming after a kill continues from the last checkpoint with the same batches (the batch order
is a pure function of seed, epoch and position) and the same AdamW state, so it ends with the
same weights as an uninterrupted run.

With ``eval_data`` the task's metrics on held-out data are computed every ``eval_every`` steps
(and after the last step); the best adapter by the task's metric is kept beside the latest
checkpoint (``StateDir.save_best``), and ``early_stop`` evaluations in a row without improvement
end the run. The evaluation record is part of each checkpoint, so resuming keeps it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgetune.bundle import Bundle, sha256_file
from edgetune.errors import EdgetuneError, TrainingError
from edgetune.runtime.backend import choose_backend, open_backend
from edgetune.runtime.eval_tracker import EvalTracker
from edgetune.runtime.packing import SHUFFLED, choose_layout, collate, make_plan
from edgetune.runtime.schedule import LinearSchedule
from edgetune.runtime.state import StateDir
from edgetune.runtime.tasks import get_task

# What must match for --resume to continue the same run (anything else may change, e.g. threads).
RUN_IDENTITY = ("data_sha256", "seed", "batch_size", "grad_accum", "max_seq_len", "total_steps", "lr", "warmup", "eval",
                "layout")
LEGACY_IDENTITY = {"layout": SHUFFLED}  # runs saved before a setting existed ran with this value


@dataclass
class TrainOptions:
    data: Path
    steps: int | None = None  # optimizer steps; default: one epoch when neither is given
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 256
    lr: float = 2e-4
    warmup: int = 0
    seed: int = 0
    threads: int = 0
    save_every: int = 50
    resume: bool = False
    restart: bool = False
    skip_bad: bool = False
    backend: str = "auto"  # a name registered in runtime/backend.py, or auto
    state_dir: Path | None = None
    eval_data: Path | None = None  # held-out data evaluated during training
    eval_every: int | None = None  # steps between evaluations (default with eval_data: save_every)
    early_stop: int | None = None  # evaluations without improvement before stopping
    packing: bool | None = None  # None: pack instruction and chat data (runtime/packing.py)
    group_by_length: bool = False  # unpacked batches of similar lengths

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_seq_len", "save_every"):
            if getattr(self, name) <= 0:
                raise EdgetuneError(f"`--{name.replace('_', '-')}` must be positive, got {getattr(self, name)}.")
        if self.steps is not None and self.steps <= 0:
            raise EdgetuneError(f"`--steps` must be positive, got {self.steps}.")
        if self.epochs is not None and self.epochs <= 0:
            raise EdgetuneError(f"`--epochs` must be positive, got {self.epochs}.")
        if self.steps is not None and self.epochs is not None:
            raise EdgetuneError("give --steps or --epochs, not both.")
        if self.packing and self.group_by_length:
            raise EdgetuneError("--group-by-length sorts unpacked batches; give it with --no-packing, or drop --packing.")
        if self.resume and self.restart:
            raise EdgetuneError("give --resume or --restart, not both.")
        if (self.eval_every is not None or self.early_stop is not None) and self.eval_data is None:
            raise EdgetuneError("--eval-every and --early-stop need --eval-data (held-out JSONL).")
        if self.eval_data is not None:
            EvalTracker(self.eval_every or self.save_every, self.early_stop)  # checks both numbers
        self.backend = choose_backend(self.backend)  # before any data is read; resolves auto


@dataclass
class TrainResult:
    steps: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    checkpoint: Path | None = None
    data: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)  # {"step", metrics...} of each evaluation this call ran
    best: dict | None = None  # {"step", "metrics", "folder"} of the best evaluation so far
    stopped_early_at: int | None = None
    layout: str = SHUFFLED
    row_tokens: int = 0  # batch rows x width: real tokens + padding

    @property
    def efficiency(self) -> float:
        """Real tokens / row tokens: how much of what the graph computed was not padding."""
        return self.tokens / self.row_tokens if self.row_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train(bundle: Bundle, opts: TrainOptions, progress: bool = True, log=print) -> TrainResult:
    manifest = bundle.manifest
    task = get_task(manifest.task)
    examples, stats = task.load(bundle, opts.data, opts.max_seq_len, opts.skip_bad)
    held = task.load(bundle, opts.eval_data, opts.max_seq_len, opts.skip_bad)[0] if opts.eval_data else None
    tracker = EvalTracker(opts.eval_every or opts.save_every, opts.early_stop, task.rank) if held else None
    state = StateDir(bundle.state_folder(opts.state_dir))
    if opts.restart:  # before reading LATEST: a damaged pointer must not block starting over
        state.clear()
        latest = None
    else:
        latest = state.latest()
    if latest is not None and latest.trainer.get("step", 0) > 0 and not opts.resume:
        raise EdgetuneError(
            f"{state.folder} holds a run at step {latest.trainer['step']}; pass --resume to continue it "
            "or --restart to start over from the bundle's adapter."
        )

    # Packing and length grouping are for causal-LM rows; other tasks' batches are their own (runtime/tasks.py).
    layout = choose_layout(opts.packing, opts.group_by_length, stats.shape, manifest, log) if manifest.task == "causal-lm" else SHUFFLED
    plan = make_plan(layout, examples, opts.batch_size, opts.seed, opts.max_seq_len)
    per_epoch = math.ceil(plan.batches_per_epoch / opts.grad_accum)
    total = opts.steps or max(1, math.ceil((opts.epochs or 1.0) * per_epoch))
    identity = {"data_sha256": sha256_file(opts.data), "seed": opts.seed, "batch_size": opts.batch_size,
                "grad_accum": opts.grad_accum, "max_seq_len": opts.max_seq_len, "total_steps": total,
                "lr": opts.lr, "warmup": opts.warmup, "layout": layout,
                "eval": {"data_sha256": sha256_file(opts.eval_data), "every": tracker.every, "early_stop": tracker.patience}
                if tracker else None}
    start = 0
    if latest is not None and opts.resume and latest.trainer.get("step", 0) > 0:
        saved = latest.trainer.get("run")
        saved = saved if isinstance(saved, dict) else {}  # a damaged trainer.json: every setting "changed"
        changed = [f"{k}: {saved.get(k, LEGACY_IDENTITY.get(k))!r} -> {identity[k]!r}" for k in RUN_IDENTITY
                   if saved.get(k, LEGACY_IDENTITY.get(k)) != identity[k]]
        if changed:
            raise EdgetuneError(f"cannot --resume: the run's settings changed ({'; '.join(changed)}); "
                                "use the same data and options, or pass --restart.")
        start = int(latest.trainer["step"])
        try:
            plan.restore(latest.trainer["position"])
        except (KeyError, TypeError, ValueError):
            raise TrainingError(f"{latest.folder}/trainer.json has no valid data position; "
                                "the state is damaged — pass --restart to start over.") from None
        if tracker is not None:
            tracker.restore(latest.trainer.get("eval"), f"{latest.folder}/trainer.json")
        log(f"resuming from step {start} ({latest.folder.name})")
    elif opts.resume:
        log("no earlier run to resume; starting from the bundle's adapter")
    # Lines after the resumed checkpoint (all of them when starting at 0, e.g. after a kill before
    # the first checkpoint) are redone, so metrics.jsonl equals an uninterrupted run's.
    state.truncate_metrics(start)
    state.rewind_best(start, tracker.best_step if tracker else None)  # bests a killed run wrote after `start`
    result = TrainResult(steps=total, start_step=start, data=asdict(stats), layout=layout)
    if latest is not None and opts.resume and latest.trainer.get("stopped_early"):
        result.stopped_early_at, result.checkpoint = start, latest.folder
        result.best = _best_summary(state)
        log(f"the run stopped early at step {start} (no improvement in {opts.early_stop} evaluations); nothing to do")
        return result

    schedule = LinearSchedule(opts.lr, total, opts.warmup)
    backend = open_backend(opts.backend, bundle, checkpoint=latest.ort_checkpoint if latest else None,
                           threads=opts.threads, with_eval=held is not None or task.prepare is not None)
    from edgetune.devices.emulate import arm_cap

    arm_cap()  # under `train --emulate`: the device's memory cap starts once the sessions are loaded
    if task.prepare is not None:  # e.g. dpo: reference log-probabilities, computed once and cached
        examples = task.prepare(bundle, backend, examples, state, identity["data_sha256"], log)
        if held is not None:
            held = task.prepare(bundle, backend, held, state, identity["eval"]["data_sha256"], log)
    pad = manifest.tokenizer.pad_token_id

    def save(step: int, stopped_early: bool = False):
        trainer = {"step": step, "position": plan.position, "run": identity, "backend": backend.name,
                   "base_model_sha256": manifest.base_sha256, "num_examples": len(examples),
                   "last_loss": result.losses[-1] if result.losses else None}
        if tracker is not None:
            trainer["eval"] = tracker.to_dict()
            trainer["stopped_early"] = stopped_early
        saved = state.save(trainer, backend.trainable(), backend.save)
        if tracker is not None:
            state.prune_best(tracker.best_step)
        return saved

    def evaluate(step: int) -> bool:
        """Score the held-out data now; keep the adapter as the best when it is; True: stop early."""
        metrics = task.evaluate(bundle, backend, held, opts.batch_size)
        improved = tracker.record(step, metrics)
        if improved:
            state.save_best({"step": step, "eval": metrics, "metric": task.metric, "run": identity,
                             "base_model_sha256": manifest.base_sha256, "num_examples": len(examples),
                             "origin": f"trained, step {step} (best eval {task.metric})"},
                            backend.trainable())
        row = {"step": step, "eval": {k: round(v, 6) for k, v in metrics.items()}, "best": improved}
        state.append_metrics(row)
        result.evals.append({"step": step, **metrics})
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}", **{f"eval_{task.metric}": f"{metrics[task.metric]:.4f}"})
        return tracker.should_stop

    batches = iter(plan)
    bar = _progress(total, start, progress)
    t0 = time.perf_counter()
    for step in range(start, total):
        step_start, step_loss, step_tokens = time.perf_counter(), 0.0, 0
        for _ in range(opts.grad_accum):
            _, _, rows = next(batches)
            if manifest.task == "causal-lm":  # rows of one or more examples (runtime/packing.py)
                batch = collate(examples, rows, pad)
            else:
                batch = task.batch([examples[i] for row in rows for i in row], pad)
            loss = backend.train_step(batch)
            if not math.isfinite(loss):
                backend.discard_gradients()
                kept = state.latest()
                where = f"the checkpoint at step {kept.trainer['step']} in {kept.folder} is kept" if kept else "no checkpoint was written"
                raise TrainingError(f"the loss became {loss} at step {step + 1}; training stopped and {where}. "
                                    "Lower --lr or check the data.")
            step_loss += loss / opts.grad_accum
            step_tokens += int((batch["attention_mask"] > 0).sum())  # segment ids: 0 is padding
            result.row_tokens += batch["input_ids"].size
        lr = schedule(step)
        backend.optimizer_step(lr)
        elapsed = time.perf_counter() - step_start
        result.losses.append(step_loss)
        result.tokens += step_tokens
        state.append_metrics({"step": step + 1, "loss": round(step_loss, 6), "lr": lr, "tokens": step_tokens,
                              "tokens_per_s": round(step_tokens / elapsed, 1), "seconds": round(elapsed, 4)})
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{step_tokens / elapsed:.0f}")
        stop = tracker is not None and tracker.due(step + 1, total) and evaluate(step + 1)
        if stop or (step + 1) % opts.save_every == 0 or step + 1 == total:
            result.checkpoint = save(step + 1, stopped_early=stop).folder
        bar.update(1)
        if stop:
            result.stopped_early_at = step + 1
            log(f"stopping early at step {step + 1}: no better eval {task.metric} in {tracker.patience} evaluations "
                f"(best at step {tracker.best_step})")
            break
    bar.close()
    result.best = _best_summary(state) if tracker is not None else None
    result.seconds = time.perf_counter() - t0
    if result.checkpoint is None and latest is not None:
        result.checkpoint = latest.folder
    return result


def _best_summary(state: StateDir) -> dict | None:
    best = state.best()
    return None if best is None else {"step": best.trainer["step"], "metrics": best.trainer.get("eval"),
                                      "folder": str(best.folder)}


def _progress(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


