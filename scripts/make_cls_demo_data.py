"""Writes the classification demo's labelled messages (edgetune/data/intents-*.jsonl), deterministically.

Three intents of short assistant requests: ``weather`` (asking about the weather), ``music`` (asking
to play or control music) and ``alarm`` (alarms, timers and reminders). Sentences come from
templates filled with places, times, artists and songs; the held-out file uses templates, places,
artists and times never seen in training, so a classifier must generalise from meaning, not copy
phrases. Labels are names in the training file and a mix of names and indices (0 weather, 1 music,
2 alarm) in the held-out file, as users may write either.

    python scripts/make_cls_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LABELS = ("weather", "music", "alarm")
TRAIN = {
    "weather": ["what's the weather in {place}", "will it rain in {place} {when}", "is it cold outside",
                "how hot will it be {when}", "do I need an umbrella {when}", "is it going to snow in {place}",
                "what's the forecast for {when}", "how windy is it in {place}"],
    "music": ["play {artist}", "put on some {genre}", "play {song} by {artist}", "skip this song",
              "turn the music up", "pause the music", "shuffle my {genre} playlist", "play something by {artist}"],
    "alarm": ["wake me up at {time}", "set an alarm for {time}", "set a timer for {minutes} minutes",
              "remind me to {task} at {time}", "cancel my {time} alarm", "snooze the alarm",
              "start a {minutes} minute timer", "remind me to {task} {when}"],
}
HELD = {
    "weather": ["any chance of showers in {place} {when}", "should I bring a jacket {when}",
                "how sunny is it in {place} right now", "tell me the temperature in {place}"],
    "music": ["I want to hear {artist}", "queue up {song}", "could you play a {genre} mix", "next track please"],
    "alarm": ["alert me at {time}", "countdown {minutes} minutes", "don't let me forget to {task} at {time}",
              "get me up at {time} {when}"],
}
FILL_TRAIN = {"place": ["Oslo", "Paris", "Tokyo", "Lima", "Cairo", "Boston"], "when": ["tomorrow", "tonight", "this weekend"],
              "artist": ["Adele", "Queen", "Miles Davis", "Taylor Swift"], "genre": ["jazz", "rock", "classical"],
              "song": ["Hello", "Yesterday", "Halo"], "time": ["6 am", "7:30", "noon"], "minutes": ["5", "10", "25"],
              "task": ["call mum", "water the plants", "buy milk"]}
FILL_HELD = {"place": ["Berlin", "Nairobi", "Madrid"], "when": ["on Friday", "later today"],
             "artist": ["Beyonce", "the Beatles", "Bach"], "genre": ["hip hop", "blues"], "song": ["Imagine", "Jolene"],
             "time": ["5:45", "9 pm"], "minutes": ["3", "40"], "task": ["feed the cat", "pay the rent"]}


def rows(rng: random.Random, templates: dict, fill: dict, per_label: int, mixed_labels: bool) -> list[dict]:
    out = []
    for index, label in enumerate(LABELS):
        seen: set[str] = set()
        tries = 0
        while len(seen) < per_label and tries < 100 * per_label:  # distinct texts per label (fewer if the pool is small)
            tries += 1
            template = rng.choice(templates[label])
            text = template.format(**{k: rng.choice(v) for k, v in fill.items()})
            if text in seen:
                continue
            seen.add(text)
            out.append({"text": text, "label": index if mixed_labels and len(seen) % 2 else label})
    rng.shuffle(out)
    return out


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "edgetune" / "data"
    out.mkdir(exist_ok=True)
    rng = random.Random(2024)
    for name, templates, fill, per_label, mixed in (("intents-train.jsonl", TRAIN, FILL_TRAIN, 24, False),
                                                     ("intents-heldout.jsonl", HELD, FILL_HELD, 12, True)):
        data = rows(rng, templates, fill, per_label, mixed)
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in data))
        counts = {label: sum(r["label"] in (label, i) for r in data) for i, label in enumerate(LABELS)}
        print(f"wrote {out / name}: {len(data)} messages (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")


if __name__ == "__main__":
    main()
