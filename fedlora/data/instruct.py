"""Synthetic instruction following (causal LM) in Alpaca form.

Six small tasks whose answers follow from the prompt (reverse or sort words, sort
numbers, repeat a word, give an antonym) or from a fixed table the model has to
memorise (the capital of a fictional country). All words are common lower-case
English, so a BERT WordPiece vocabulary (the tiny_llama preset reuses MiniLM's) keeps
each of them in one or two pieces and a tiny model can fit the task.

Rows are ``{"prompt": alpaca_prompt(instruction, input), "completion": answer}``.
Prompts repeat (there are only a few dozen capital questions), so the held-out split
shares prompts with training data: it measures fitting, not generalisation.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fedlora.data.rows import Rows
from fedlora.data.sources import instruction_prompt

WORDS = (
    "apple",
    "river",
    "stone",
    "house",
    "green",
    "music",
    "water",
    "chair",
    "light",
    "paper",
    "table",
    "bread",
    "horse",
    "cloud",
    "money",
    "glass",
    "garden",
    "window",
    "summer",
    "winter",
    "dog",
    "cat",
    "tree",
    "book",
    "road",
    "ship",
    "bird",
    "fish",
    "hand",
    "door",
    "city",
    "song",
    "star",
    "moon",
    "fire",
    "snow",
    "rain",
    "king",
)
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
ANTONYMS = (
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("old", "new"),
    ("light", "dark"),
    ("early", "late"),
    ("high", "low"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("open", "closed"),
    ("full", "empty"),
    ("hard", "soft"),
    ("long", "short"),
    ("young", "old"),
    ("clean", "dirty"),
)
_COUNTRY_FIRST = ("north", "south", "east", "west", "green", "silver", "golden", "red")
_COUNTRY_SECOND = ("river", "island", "mountain", "forest", "valley", "coast")
_CAPITALS = (
    "maple",
    "harbor",
    "bridge",
    "castle",
    "meadow",
    "tower",
    "garden",
    "lantern",
    "anchor",
    "willow",
    "summit",
    "orchard",
    "falls",
    "haven",
    "crown",
    "market",
    "station",
    "temple",
    "canyon",
    "spring",
    "marsh",
    "beacon",
    "field",
    "gate",
)
WORLD_SEED = 20240601  # the country -> capital table is the same for every run seed

Task = Callable[[random.Random], tuple[str, str, str]]  # -> instruction, input, answer


def capitals() -> dict[str, str]:
    """Return the fixed fictional country -> capital table (24 entries, every call)."""
    rng = random.Random(WORLD_SEED)
    countries = [f"{a} {b}" for a in _COUNTRY_FIRST for b in _COUNTRY_SECOND]
    rng.shuffle(countries)
    cities = list(_CAPITALS)
    rng.shuffle(cities)
    return dict(zip(countries, cities, strict=False))


def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 6))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = _words(rng)
    return "reverse the order of these words.", " ".join(words), " ".join(words[::-1])


def _sort_words(rng: random.Random) -> tuple[str, str, str]:
    words = _words(rng)
    return "sort these words alphabetically.", " ".join(words), " ".join(sorted(words))


def _sort_numbers(rng: random.Random) -> tuple[str, str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 6))
    return (
        "sort these numbers from smallest to largest.",
        " ".join(map(str, numbers)),
        " ".join(map(str, sorted(numbers))),
    )


def _repeat(rng: random.Random) -> tuple[str, str, str]:
    word, times = rng.choice(WORDS), rng.randint(2, 5)
    return (
        f"repeat the word {word} {NUMBER_WORDS[times]} times.",
        "",
        " ".join([word] * times),
    )


def _antonym(rng: random.Random) -> tuple[str, str, str]:
    word, opposite = rng.choice(ANTONYMS)
    return f"what is the opposite of {word}?", "", opposite


def _make_capital_task(table: dict[str, str]) -> Task:
    countries = sorted(table)

    def capital(rng: random.Random) -> tuple[str, str, str]:
        country = rng.choice(countries)
        return f"what is the capital of {country}?", "", table[country]

    return capital


def generate(num_examples: int, seed: int, prompt_format: str = "alpaca") -> Rows:
    """Generate ``num_examples`` instruction/response pairs.

    Parameters
    ----------
    num_examples : int
        Rows to generate; the tasks take turns, so each gets about a sixth.
    seed : int
        Seed of every random choice; equal seeds give identical datasets.
    prompt_format : str (default: "alpaca")
        ``alpaca`` or ``chat`` (see :func:`fedlora.data.sources.instruction_prompt`).

    Returns
    -------
    Rows
        Rows ``{"prompt": str, "completion": str}`` in shuffled task order.
    """
    tasks: list[Task] = [
        _reverse,
        _sort_words,
        _sort_numbers,
        _repeat,
        _antonym,
        _make_capital_task(capitals()),
    ]
    rng = random.Random(seed)
    order = [i % len(tasks) for i in range(num_examples)]
    rng.shuffle(order)
    prompts, completions = [], []
    for task_id in order:
        instruction, input_text, answer = tasks[task_id](rng)
        prompts.append(instruction_prompt(instruction, input_text, prompt_format))
        completions.append(answer)
    return Rows.from_dict({"prompt": prompts, "completion": completions})
