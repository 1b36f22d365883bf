"""``GET /``: a small self-contained HTML status page (no scripts), loss per round as inline SVG."""

from __future__ import annotations

from html import escape

_W, _H, _PAD = 480, 180, 32


def loss_svg(rounds: list[dict]) -> str:
    """Polyline of the devices' mean training loss per aggregated round; empty note when none yet."""
    points = [(r["round"], r["loss"]) for r in rounds if r.get("loss") is not None]
    if not points:
        return "<p>No aggregated round with a reported loss yet.</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x, y):
        return (_PAD + (x - x0) / (x1 - x0) * (_W - 2 * _PAD), _H - _PAD - (y - y0) / (y1 - y0) * (_H - 2 * _PAD))

    coords = [px(x, y) for x, y in points]
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in coords)
    dots = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3"><title>round {x}: {y:.4f}</title></circle>'
                   for (a, b), (x, y) in zip(coords, points))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
            f'aria-label="mean training loss per round">'
            f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#888"/>'
            f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#888"/>'
            f'<text x="{_PAD}" y="{_PAD - 8}" font-size="11">loss {y1:.4g}</text>'
            f'<text x="{_PAD}" y="{_H - 8}" font-size="11">{y0:.4g} · round {x0} … {x1}</text>'
            f'<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{line}"/>'
            f'<g fill="#1f6feb">{dots}</g></svg>')


def _number(x) -> str:
    return "" if x is None else f"{x:.4f}"


def render(s: dict) -> str:
    rows = "".join(f"<tr><td>{r['round']}</td><td>{r['accepted']}</td><td>{r['examples']}</td>"
                   f"<td>{_number(r['loss'])}</td>"
                   f"<td>{escape(str(r['aggregator'] or ''))}</td><td>{escape(r['closed_at'] or 'open')}</td></tr>"
                   for r in reversed(s["rounds"]))
    reasons = "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>" for k, v in s["refused_by_reason"].items())
    recent = "".join(f"<tr><td>{escape(str(r['at']))}</td><td>{escape(str(r['device_id']))}</td><td>{r['status']}</td>"
                     f"<td>{escape(r['reason'])}</td><td>{escape(r['message'])}</td></tr>" for r in s["recent_refusals"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgetune collector</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:2px 10px;text-align:left}}</style></head><body>
<h1>edgetune collector</h1>
<p>Round <b>{s['current_round']}</b> open · {s['devices']} devices · {s['accepted_total']} updates accepted ·
{s['refused_total']} refused · method {escape(s['method']['name'])} ({escape(s['space'])} aggregation) ·
base model <code>{escape(s['base_model_sha256'][:16])}…</code></p>
<h2>Mean training loss per round</h2>{loss_svg(s['rounds'])}
<h2>Rounds</h2><table><tr><th>round</th><th>updates</th><th>examples</th><th>loss</th><th>aggregator</th>
<th>closed</th></tr>{rows}</table>
<h2>Refused, by reason</h2><table><tr><th>reason</th><th>count</th></tr>{reasons}</table>
<h2>Latest refusals</h2><table><tr><th>at</th><th>device</th><th>status</th><th>reason</th><th>message</th></tr>
{recent}</table></body></html>
"""
