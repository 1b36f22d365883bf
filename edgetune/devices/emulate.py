"""``train --emulate NAME``: run training here under a device profile's threads and memory cap.

The parent re-executes the same ``train`` command in a child process (``python -m
edgetune.devices.emulate``) with ``--threads`` set to the profile's and a hard memory cap:

- cgroup v2, where this machine lets us create a child cgroup with the memory controller: the
  child runs in it with ``memory.max`` = the profile's app memory and ``memory.swap.max`` = 0; the
  kernel kills it when it goes over (as Android's low-memory killer or iOS's jetsam would).
- otherwise ``RLIMIT_DATA``: the child arms it once the training sessions are loaded
  (``arm_cap``, called by the trainer), at (private writable memory now) + (cap - resident now).
  Loading leaves ~0.75 GB of address space committed but never touched (a fragmented malloc heap,
  thread stacks), so a limit set at start would cap far below the resident memory; from the
  armed point on, committed memory grows with resident memory (measured: +265 MB committed for
  +262 MB resident across a step), so the cap bites where resident memory reaches the profile's.
  An allocation past it fails inside onnxruntime ("Failed to allocate memory") or numpy
  (MemoryError); the child turns either into the one-line message below.

Either way the run stops with a message naming the profile, the cap and the step, and the last
checkpoint (written crash-safe: temp folder, fsync, rename) is left as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from edgetune.errors import EdgetuneError

ENV = "EDGETUNE_EMULATE"  # JSON: {"device", "cap_bytes", "threads", "mode", "state_folder"}
MB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
ALLOCATION_FAILURES = ("Failed to allocate memory", "bad allocation", "std::bad_alloc")


class EmulatedOutOfMemory(EdgetuneError):
    """The run went over the emulated device's memory cap."""


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def arm_cap() -> None:
    """In an emulated child using the rlimit: set RLIMIT_DATA so resident memory may reach the cap.

    No-op in any other process. Called once the training sessions exist (``runtime/trainer.py``).
    """
    spec = _spec()
    if spec is None or spec["mode"] != "rlimit":
        return
    headroom = spec["cap_bytes"] - _status_kb("VmRSS")
    if headroom <= 0:
        raise _out_of_memory(spec, "loading the bundle")
    import resource  # Unix only

    limit = _status_kb("VmData") + headroom
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def _spec() -> dict | None:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else None


def _cgroup_v2_child(cap_bytes: int) -> Path | None:
    """A fresh cgroup v2 below ours with ``memory.max`` set, or None when this machine does not allow it."""
    try:
        if "memory" not in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
            return None
        own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
        parent = CGROUP_ROOT / own.strip().lstrip("/")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            return None
        group = parent / f"edgetune-emulate-{os.getpid()}"
        group.mkdir()
        try:
            (group / "memory.max").write_text(str(cap_bytes))
            if (group / "memory.swap.max").exists():
                (group / "memory.swap.max").write_text("0")
        except OSError:
            group.rmdir()
            return None
        return group
    except (OSError, StopIteration):
        return None


def run_emulated(profile, argv: list[str], state_folder: Path) -> None:
    """Run ``edgetune train`` ``argv`` in a child under ``profile``'s threads and memory cap."""
    cap = profile.app_bytes
    group = _cgroup_v2_child(cap)
    spec = {"device": profile.name, "cap_bytes": cap, "threads": profile.threads,
            "mode": "cgroup" if group else "rlimit", "state_folder": str(state_folder)}
    print(f"emulating {profile.name}: {profile.threads} threads, memory cap {profile.app_mb} MB "
          f"({'cgroup v2 memory.max' if group else 'RLIMIT_DATA, armed after loading'})", file=sys.stderr)

    def enter_group():  # in the child, before exec: the whole child runs under memory.max
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    env = {**os.environ, ENV: json.dumps(spec), "OMP_NUM_THREADS": str(profile.threads)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "edgetune.devices.emulate", *argv], env=env,
                                preexec_fn=enter_group, stderr=subprocess.PIPE)
        _pass_stderr(proc.stderr)
        proc.wait()
    finally:
        if group is not None:
            try:
                group.rmdir()
            except OSError:
                pass
    if proc.returncode == 0:
        return
    if proc.returncode < 0:  # killed: the cgroup's OOM killer (SIGKILL) or an abort inside the engine
        raise _out_of_memory(spec, f"a step (the child was stopped by {signal.Signals(-proc.returncode).name})")
    raise SystemExit(proc.returncode)  # the child already printed its one-line error


ORT_LOG = (b"[E:onnxruntime:", b"[W:onnxruntime:")


def _pass_stderr(stream) -> None:
    """Copy the child's stderr through as it comes (progress bars included), leaving out the lines
    onnxruntime logs itself when an allocation fails: the child's own one-line error says it."""
    pending = b""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    while chunk := os.read(stream.fileno(), 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        text = b"".join(line + b"\n" for line in lines if not any(tag in line for tag in ORT_LOG)
                        and line.strip() != b"\x1b[m")
        if pending and b"onnxruntime" not in pending and not pending.startswith(b"\x1b["):
            text, pending = text + pending, b""  # a progress bar's \r update: show it now
        if text:
            if out is not None:
                out.write(text)
                out.flush()
            else:  # a captured stderr (tests)
                sys.stderr.write(text.decode(errors="replace"))
    stream.close()


def _out_of_memory(spec: dict, when: str) -> EmulatedOutOfMemory:
    from edgetune.runtime.state import StateDir

    state = StateDir(Path(spec["state_folder"]))
    try:
        kept = state.latest()
    except EdgetuneError:
        kept = None
    where = (f"the checkpoint at step {kept.trainer['step']} ({kept.folder}) is intact; continue with --resume"
             if kept else "no checkpoint had been written yet")
    return EmulatedOutOfMemory(
        f"out of memory under --emulate {spec['device']} (cap {spec['cap_bytes'] // MB} MB, {spec['threads']} threads) "
        f"during {when}: the device would stop this run too; {where}. Lower --batch-size or --max-seq-len, or export "
        f"with --recompute full (`edgetune plan BUNDLE --device {spec['device']}` lists what fits).")


def _last_step(spec: dict) -> int:
    path = Path(spec["state_folder"]) / "metrics.jsonl"
    step = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                step = max(step, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return step


def _child(argv: list[str]) -> None:
    """Entry of the emulated child: ``edgetune train ...``; allocation failures become one line."""
    from edgetune.cli import main

    spec = _spec()
    try:
        main(argv)
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not any(s in str(exc) for s in ALLOCATION_FAILURES):
            raise
        if "--debug" in argv:
            raise
        # on a line of its own: a progress bar may be half-drawn
        print(f"\nerror: {_out_of_memory(spec, f'step {_last_step(spec) + 1}')}", file=sys.stderr)
        sys.exit(EmulatedOutOfMemory.exit_code)


if __name__ == "__main__":
    _child(sys.argv[1:])


def emulate_train(ctx, device: str, bundle: Path, state_dir: Path | None) -> None:
    """``train --emulate DEVICE``: the same command again in a capped child (see ``run_emulated``)."""
    from edgetune.devices.profile import get_profile

    profile = get_profile(device)
    argv = _argv(ctx, drop={"emulate", "threads"}) + ["--threads", str(profile.threads)]
    if (ctx.obj or {}).get("debug"):
        argv.insert(0, "--debug")
    state_folder = Path(state_dir) if state_dir is not None else Path(bundle) / "train-state"
    run_emulated(profile, [ctx.info_name, *argv], state_folder)


def _argv(ctx, drop: set[str]) -> list[str]:
    """The command line that gives ``ctx.params`` again: positional arguments, then options that differ
    from their defaults."""
    import click

    positional, options = [], []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop or value is None:
            continue
        if isinstance(param, click.Argument):
            positional.append(str(value))
        elif param.is_flag:
            if value:
                options.append(param.opts[0])
            elif param.secondary_opts:  # an on/off pair left unset is None (skipped above): False is --no-...
                options.append(param.secondary_opts[0])
        elif value != param.default:
            options += [param.opts[0], str(value)]
    return positional + options
