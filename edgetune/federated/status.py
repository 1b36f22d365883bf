"""What ``collect status`` prints and ``GET /v1/status`` returns: rounds, counts, refusals, metrics."""

from __future__ import annotations

from edgetune.federated.store import Store


def status(store: Store, collector=None) -> dict:
    """A JSON-ready summary of ``store``; ``collector`` (when serving) adds the live round settings."""
    accepted = store.accepted_by_round()
    refused = store.refusal_counts()
    rounds = []
    for r in store.rounds():
        report = r.report or {}
        n, examples = accepted.get(r.round, (0, 0))
        rounds.append({"round": r.round, "opened_at": r.opened_at, "closed_at": r.closed_at,
                       "global_sha256": r.global_sha256, "accepted": n, "examples": examples or 0,
                       "loss": report.get("loss"), "aggregator": report.get("aggregator"),
                       "trigger": report.get("trigger"), "late": report.get("late"), "clipped": report.get("clipped"),
                       "discarded_energy_max": report.get("discarded_energy_max"),
                       "dp_epsilon_total": report.get("dp", {}).get("epsilon_total"),
                       "dp_noise_multiplier": report.get("dp", {}).get("noise_multiplier")})
    current = rounds[-1]
    out = {"store": str(store.folder), "base_model_sha256": store.meta("base_model_sha256"),
           "method": store.meta("method"), "space": store.meta("space"), "current_round": current["round"],
           "devices": store.device_count(), "accepted_total": sum(n for n, _ in accepted.values()),
           "refused_total": sum(refused.values()), "refused_by_reason": refused,
           "recent_refusals": store.recent_refusals(), "rounds": rounds}
    if collector is not None:
        info = collector.round_info()
        out.update(deadline=info["deadline"], min_updates=info["min_updates"],
                   aggregator=collector.aggregation.aggregator, last_aggregation_error=collector.last_error)
    return out


def status_text(s: dict) -> str:
    """Plain-text rendering for the terminal."""
    lines = [f"store      {s['store']}",
             f"base model sha256 {s['base_model_sha256']}; method {s['method']['name']} ({s['space']} aggregation)",
             f"devices    {s['devices']}; updates accepted {s['accepted_total']}, refused {s['refused_total']}",
             f"round      {s['current_round']} open, {s['rounds'][-1]['accepted']} update(s) so far"]
    if s["refused_by_reason"]:
        lines.append("refused    " + ", ".join(f"{k}: {v}" for k, v in s["refused_by_reason"].items()))
    lines.append("")
    lines.append(f"{'round':>5}  {'updates':>7}  {'examples':>8}  {'loss':>8}  {'aggregator':<12}  "
                 f"{'discarded':>9}  {'DP eps':>7}  closed")
    for r in s["rounds"]:
        lines.append(f"{r['round']:>5}  {r['accepted']:>7}  {r['examples']:>8}  {_num(r['loss'], '.4f'):>8}  "
                     f"{(r['aggregator'] or '—'):<12}  {_num(r['discarded_energy_max'], '.2e'):>9}  "
                     f"{_num(r['dp_epsilon_total'], '.3g'):>7}  {r['closed_at'] or 'open'}")
    return "\n".join(lines)


def _num(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)
