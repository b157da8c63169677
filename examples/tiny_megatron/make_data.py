"""Write the tiny trainer's data: the corpus (data/corpus.txt), a separate held-out text for evaluation
(data/heldout.txt) and the tokenizer (data/tokenizer/).

    .venv/bin/python examples/tiny_megatron/make_data.py     # rewrites them (commit them)

The corpus is simple English with learnable structure (station weather reports, arithmetic, a small
family tree), deterministic from a seed: a byte-level model learns its spelling and templates in a
few hundred CPU iterations, so the loss falls visibly; the last tenth (the trainer's held-out split)
follows the same distribution. The tokenizer is the trainer's: token id = byte value, 256 =
end of text, as a HuggingFace fast tokenizer (byte-level BPE without merges) so a converted
checkpoint can be evaluated offline; the trainer saves it into every checkpoint, as Megatron-LM does.
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


def byte_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character table, with each byte's id = its value
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {chars[b]: b for b in range(256)} | {"<|endoftext|>": 256}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    sample = "At Oulu the sky is clear, ä €"
    assert fast(sample)["input_ids"] == list(sample.encode())


if __name__ == "__main__":
    data = Path(__file__).with_name("data")
    data.mkdir(exist_ok=True)
    (data / "corpus.txt").write_text(corpus())
    # text the trainer never sees, from the same distribution: what the demo's evaluation scores
    (data / "heldout.txt").write_text(corpus(seed=4321, sentences=80))
    byte_tokenizer(data / "tokenizer")
    print(f"{data}: corpus.txt {(data / 'corpus.txt').stat().st_size} bytes, heldout.txt, tokenizer/")
