"""Writes the DPO demo's preference pairs (edgetune/data/prefs-*.jsonl), deterministically.

The preference: the user wants a fixed answer format, ``Answer: <value>.``, over a plain sentence
saying the same thing. Both replies are correct and about as long, so the only signal is the
format. Held-out pairs use numbers, countries, words and animals never seen in training;
no prompt appears twice in a file.

    python scripts/make_dpo_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS_TRAIN = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
                  "Peru": "Lima", "Norway": "Oslo", "Kenya": "Nairobi", "Canada": "Ottawa", "Greece": "Athens",
                  "Poland": "Warsaw", "Chile": "Santiago"}
CAPITALS_HELD = {"Germany": "Berlin", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna"}
OPPOSITES_TRAIN = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "early": "late",
                   "full": "empty", "hard": "soft", "rich": "poor", "open": "closed"}
OPPOSITES_HELD = {"wet": "dry", "old": "new", "loud": "quiet", "high": "low"}
LEGS_TRAIN = {"dog": 4, "bird": 2, "spider": 8, "cat": 4, "ant": 6, "horse": 4, "duck": 2, "bee": 6}
LEGS_HELD = {"cow": 4, "chicken": 2, "beetle": 6}


def pairs(rng: random.Random, capitals, opposites, legs, numbers: range, count: int) -> list[dict]:
    makers = [
        lambda: (lambda a, b: (f"What is {a} plus {b}?", f"{a + b}", f"{a} plus {b} is {a + b}."))(
            rng.choice(numbers), rng.choice(numbers)),
        lambda: (lambda c: (f"What is the capital of {c}?", capitals[c], f"The capital of {c} is {capitals[c]}."))(
            rng.choice(sorted(capitals))),
        lambda: (lambda w: (f"What is the opposite of {w}?", opposites[w], f"The opposite of {w} is {opposites[w]}."))(
            rng.choice(sorted(opposites))),
        lambda: (lambda a: (f"How many legs does a {a} have?", str(legs[a]), f"A {a} has {legs[a]} legs."))(
            rng.choice(sorted(legs))),
    ]
    out, seen, i = [], set(), 0
    while len(out) < count:  # kinds in turn; a prompt already written is drawn again (small pools repeat)
        prompt, value, sentence = makers[i % len(makers)]()
        i += 1
        if prompt in seen and i < 50 * count:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "chosen": f"Answer: {value}.", "rejected": sentence})
    return out


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "edgetune" / "data"
    out.mkdir(exist_ok=True)
    rng = random.Random(4321)
    for name, count, args in (("prefs-train.jsonl", 96, (CAPITALS_TRAIN, OPPOSITES_TRAIN, LEGS_TRAIN, range(2, 30))),
                              ("prefs-heldout.jsonl", 24, (CAPITALS_HELD, OPPOSITES_HELD, LEGS_HELD, range(31, 60)))):
        rows = pairs(rng, *args, count)
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {out / name}: {count} preference pairs")


if __name__ == "__main__":
    main()
