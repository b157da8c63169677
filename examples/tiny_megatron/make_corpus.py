"""Write the tiny trainer's corpus (data/corpus.txt): simple English with learnable structure
(station weather reports, arithmetic, a small family tree), deterministic from a seed.

    python examples/tiny_megatron/make_corpus.py     # rewrites data/corpus.txt (commit it)

A byte-level model learns its spelling and templates in a few hundred CPU iterations, so the loss
falls visibly; the last tenth (the trainer's held-out split) follows the same distribution.
"""

from __future__ import annotations

import random
from pathlib import Path

STATIONS = ["Oulu", "Bologna", "Juelich", "Barcelona", "Kajaani", "Turin", "Espoo", "Madrid"]
SKIES = ["clear", "cloudy", "rainy", "foggy", "windy", "snowy"]
NAMES = ["Ada", "Bruno", "Carla", "Dmitri", "Elif", "Farah", "Goran", "Hanna", "Ivo", "Jana"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def weather(rng: random.Random) -> str:
    station, sky = rng.choice(STATIONS), rng.choice(SKIES)
    low = rng.randint(-15, 20)
    return f"At {station} the sky is {sky}, the low is {low} degrees and the high is {low + rng.randint(2, 12)}."


def arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    return f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."


def family(rng: random.Random) -> str:
    parent, child = rng.sample(NAMES, 2)
    return f"{parent} is the parent of {child}, so {child} is the child of {parent}."


def corpus(seed: int = 1234, sentences: int = 1600) -> str:
    rng = random.Random(seed)
    kinds = [weather, arithmetic, family]
    lines = []
    for _ in range(sentences // 4):
        lines.append(" ".join(rng.choice(kinds)(rng) for _ in range(4)))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("data") / "corpus.txt"
    target.parent.mkdir(exist_ok=True)
    target.write_text(corpus())
    print(f"{target}: {target.stat().st_size} bytes")
