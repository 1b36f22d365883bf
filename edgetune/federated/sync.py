"""``edgetune sync``: one federated round on the device — pull, train from the global adapter, push.

    GET round -> refuse another base model -> GET global (.etd, full) -> verify, check it fits the
    bundle -> import it as the step-0 checkpoint -> train -> write the update (diff since the
    global, or full) -> POST it with retries

Every phase is recorded in the journal (``journal.py``, in ``BUNDLE/sync-state``) before the next starts, so a re-run after a
kill continues where it stopped: training resumes from its last checkpoint, and an update that
was written is re-sent byte for byte under the same update id (the collector answers a repeat
with its first answer). A re-run after the server acknowledged does nothing until the next round.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from edgetune.errors import DeltaError, EdgetuneError
from edgetune.federated.client import CollectorClient, CollectorError, RetryPolicy, RoundInfo
from edgetune.federated.journal import SYNC_STATE, Journal, JournalFile

KINDS = ("diff", "full")
STALE = 410


@dataclass
class SyncOptions:
    server: str
    train: object  # edgetune.runtime.trainer.TrainOptions (data, steps, lr, ..., state_dir)
    sync_dir: Path | None = None  # the journal and round files (default: BUNDLE/sync-state)
    token: str | None = None
    device: str | None = None
    sign: Path | None = None  # Ed25519 private key from `edgetune keygen`
    kind: str = "diff"  # ship the difference from the round's global adapter, or the full adapter
    codec: str = "fp16"
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EdgetuneError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        if self.token is None and self.sign is None:
            raise EdgetuneError("give --token (from `edgetune collect devices add`) or --sign KEY (a key the "
                                "collector trusts for this device).")


@dataclass
class SyncResult:
    round: int
    update_id: str
    status: str  # "pushed" | "already pushed" | "refused"
    answer: dict | None = None
    losses: list[float] = field(default_factory=list)
    update_bytes: int = 0
    refused_status: int | None = None  # HTTP status of a refusal (only a stale refusal returns, not raises)


def sync(bundle: Path, opts: SyncOptions, *, client: CollectorClient | None = None,
         log: Callable[[str], None] = print, progress: bool = False) -> SyncResult:
    from edgetune.bundle import Bundle
    from edgetune.delta import load_private_key

    bundle = Bundle.open(bundle)
    manifest = bundle.manifest
    signing_key = load_private_key(opts.sign) if opts.sign else None  # a bad key fails before any traffic
    state_dir = bundle.state_folder(opts.train.state_dir)
    files = JournalFile(Path(opts.sync_dir) if opts.sync_dir else bundle.folder / SYNC_STATE)
    client = client or CollectorClient(opts.server, opts.token, opts.device, retry=opts.retry, log=log)
    info = client.round_info()
    if info.base_model_sha256 != manifest.base_sha256:
        raise CollectorError(f"--server {client.server} collects updates for base model {info.base_model_sha256[:16]}…, "
                             f"but bundle {str(bundle.folder)!r} is built on {manifest.base_sha256[:16]}…; sync this bundle "
                             "with its own collector, or export the bundle from the model the collector uses.")
    journal = files.load()
    if journal is not None and journal.server != client.server and not journal.finished:
        raise EdgetuneError(f"{files.path} holds an unfinished round {journal.round} for {journal.server}; run sync "
                            f"with --server {journal.server} to finish it, or delete the file to drop that round.")
    if journal is not None and journal.phase == "written":  # bytes exist: only ever send those, whatever the round
        result = _push(client, files, journal, log)
        if journal.round == info.round or result.refused_status != STALE:
            return result
        log(f"round {journal.round} closed before its update arrived; joining round {info.round}")
        journal = None
    if journal is not None and journal.round == info.round:
        if journal.finished:
            log(f"round {info.round}: this device's update {journal.update_id} was already {journal.phase}; "
                "nothing to do until the next round")
            return SyncResult(info.round, journal.update_id, "already " + journal.phase, journal.answer)
    elif journal is not None and not journal.finished:
        log(f"round {journal.round} closed before this device's update was written (nothing was sent); "
            f"joining round {info.round}")
        journal = None
    else:
        journal = None

    if journal is None:
        journal = _pull(client, files, info, bundle, state_dir)
        log(f"round {info.round}: imported the global adapter {info.global_sha256[:16]}…; training")
    losses: list[float] = []
    if journal.phase == "pulled":
        losses = _train(bundle, opts, state_dir, progress, log)
        journal.phase = "trained"
        files.save(journal)
    if journal.phase == "trained":
        size = _write_update(files, journal, bundle, state_dir, opts, signing_key)
        log(f"round {journal.round}: wrote update {journal.update_id} ({size:,} bytes, {opts.kind}, {opts.codec})")
    result = _push(client, files, journal, log)
    result.losses = losses
    return result


def _pull(client, files: JournalFile, info: RoundInfo, bundle, state_dir: Path) -> Journal:
    """Fetch, verify and import the round's global adapter; returns the journal at phase ``pulled``."""
    from edgetune.delta.resolve import resolve_delta
    from edgetune.runtime.import_adapter import import_adapter

    data = client.global_adapter(info.round)
    where = f"{client.server}/v1/rounds/{info.round}/global"
    resolved = resolve_delta(data, bundle.manifest)  # verify (framing, checksum, signature, values), then fit
    global_delta = resolved.delta
    # The collector names a global by its delta checksum (what an update's since_sha256 refers to);
    # the SHA-256 of the file's bytes is accepted as well.
    if info.global_sha256 not in (global_delta.sha256, hashlib.sha256(data).hexdigest()):
        raise CollectorError(f"{where}: the global adapter's checksum {global_delta.sha256[:16]}… is not the "
                             f"announced {info.global_sha256[:16]}…; the transfer was damaged or the round moved on — "
                             "run sync again.", retryable=True)
    if global_delta.kind != "full":
        raise DeltaError(f"{where}: the global adapter is a {global_delta.kind} delta; the collector must serve a full one.")
    files.prune(info.round)
    files.write_file(files.global_path(info.round), data)
    import_adapter(bundle, resolved.by_graph, f"global adapter of round {info.round}", state_dir=state_dir, force=True)
    journal = Journal(server=client.server, round=info.round, update_id=str(uuid.uuid4()),
                      global_sha256=global_delta.sha256)
    files.save(journal)
    return journal


def _train(bundle, opts: SyncOptions, state_dir: Path, progress: bool, log) -> list[float]:
    """Train from the imported global adapter; after a kill, resumes from the last checkpoint."""
    from edgetune.runtime.trainer import train

    train_opts = replace(opts.train, state_dir=state_dir, resume=True, restart=False)
    result = train(bundle, train_opts, progress=progress, log=lambda message: None)
    if result.losses:
        log(f"trained steps {result.start_step}..{result.steps}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    return result.losses


def _write_update(files: JournalFile, journal: Journal, bundle, state_dir: Path, opts: SyncOptions,
                  signing_key) -> int:
    """Encode the trained adapter as this round's update, write it, record its SHA-256 (phase ``written``)."""
    from edgetune.delta import diff, encode_delta
    from edgetune.delta.resolve import read_reference
    from edgetune.runtime.adapter_source import latest_adapter

    manifest = bundle.manifest
    adapter = latest_adapter(bundle, state_dir)
    tensors = {t.peft_key: adapter.tensors[t.graph_name] for t in manifest.trainable}
    kind, since = "full", None
    if opts.kind == "diff":
        reference = read_reference(files.global_path(journal.round), manifest)
        if reference.sha256 != journal.global_sha256:
            raise EdgetuneError(f"{files.global_path(journal.round)} is not the global adapter this round started from; "
                                f"delete {files.path} to start the round over.")
        tensors, kind, since = diff(tensors, reference.tensors), "diff", reference.sha256
    trainer = adapter.trainer or {}
    metrics = {"loss": trainer["last_loss"]} if trainer.get("last_loss") is not None else {}
    data = encode_delta(tensors, base_model_sha256=manifest.base_sha256, method=_method(manifest), codec=opts.codec,
                        kind=kind, since_sha256=since, num_examples=int(trainer.get("num_examples", 0)),
                        round_id=str(journal.round), metrics=metrics, signing_key=signing_key,
                        producer={"update_id": journal.update_id, **({"device": opts.device} if opts.device else {})})
    journal.delta_sha256 = files.write_file(files.update_path(journal.round), data)
    journal.phase = "written"
    files.save(journal)
    return len(data)


def _push(client, files: JournalFile, journal: Journal, log) -> SyncResult:
    """Send the recorded bytes under the recorded id. A refusal is final and recorded; a network
    failure after every retry leaves the journal at ``written`` for the next run."""
    data = files.read_update(journal)
    try:
        status, answer = client.push(journal.round, data, journal.update_id)
    except CollectorError as exc:
        if exc.retryable:
            raise
        journal.phase, journal.reason = "refused", str(exc)
        files.save(journal)
        if exc.status == STALE:
            log(f"round {journal.round}: update {journal.update_id} refused as stale: {exc}")
            return SyncResult(journal.round, journal.update_id, "refused", None, update_bytes=len(data),
                              refused_status=STALE)
        raise CollectorError(f"round {journal.round}: the collector refused update {journal.update_id}: {exc}",
                             exc.status) from None
    journal.phase, journal.answer = "pushed", answer
    files.save(journal)
    log(f"round {journal.round}: update {journal.update_id} {'accepted' if status == 201 else 'was already accepted'}"
        f" (weight {answer.get('weight')})")
    return SyncResult(journal.round, journal.update_id, "pushed", answer, update_bytes=len(data))


def _method(manifest) -> dict:
    return {"name": manifest.method["name"], "config": manifest.method["config"]}
