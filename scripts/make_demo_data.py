"""Writes the demo's instruction dataset (edgetune/data/records-*.jsonl), deterministically.

The task: turn a sentence about a person into a fixed record format, ``name=<name>; age=<n>;
city=<city>``. The base model answers in prose, so before/after fine-tuning is easy to measure:
the held-out exact-match rate. Held-out examples use names and cities never seen in training.

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TRAIN_NAMES = ["Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kofi", "Lena",
               "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yusuf"]
TRAIN_CITIES = ["Oslo", "Lima", "Porto", "Kyoto", "Cairo", "Dublin", "Quito", "Lyon", "Perth", "Accra", "Riga",
                "Hanoi", "Bergen", "Malmo", "Turin", "Leeds"]
HELD_NAMES = ["Amara", "Boris", "Carmen", "Dmitri", "Esther", "Felix", "Hana", "Ivan", "Leila", "Marco"]
HELD_CITIES = ["Vienna", "Seoul", "Nairobi", "Madrid", "Zurich", "Boston", "Krakow", "Delhi"]
SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, has made a home in {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "{city} is where {name} lives; {name} is {age}.",
    "At {age}, {name} still lives in {city}.",
    "Meet {name} from {city}, who is {age} years old.",
]
INSTRUCTIONS = ["Convert to a record.", "Turn this into a record.", "Write the record for this person."]


def record(rng: random.Random, names, cities) -> dict:
    name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 89)
    sentence = rng.choice(SENTENCES).format(name=name, age=age, city=city)
    return {"instruction": rng.choice(INSTRUCTIONS), "context": sentence, "output": f"name={name}; age={age}; city={city}"}


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "edgetune" / "data"
    out.mkdir(exist_ok=True)
    rng = random.Random(1234)
    for name, count, names, cities in (("records-train.jsonl", 240, TRAIN_NAMES, TRAIN_CITIES),
                                       ("records-heldout.jsonl", 24, HELD_NAMES, HELD_CITIES)):
        rows = [record(rng, names, cities) for _ in range(count)]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {out / name}: {count} records")


if __name__ == "__main__":
    main()
