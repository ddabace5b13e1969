"""Synthetic sentence classification: label = (topic, polarity) with negation.

Each sentence evaluates one *target* (a noun of one of four topics) with an adjective
whose polarity may be flipped by negation ("the match was not bad at all" is positive,
"the soup could not have been more boring" is negative). Distractors make single
keywords unreliable: a context phrase mentions another topic and a side clause gives
an opinion (of either polarity) on something that is not a topic (weather, traffic).
A reader recovers the label exactly (the opinion about the target), but a keyword or a
frozen sentence embedding does not, so a classification head on a frozen encoder
starts well below the ceiling and LoRA has something to learn. Measured with 4
classes (seed 0): a linear probe on frozen mean-pooled all-MiniLM-L6-v2 embeddings
reaches about 77% (5-fold CV, 2000 rows), a unigram bag of words 68%; LoRA (r=8 on
query/value, head trained) reaches about 99% after 240 steps of batch 32.

Classes are ``(topic, polarity)`` pairs in the order of :func:`class_names`; with
``num_classes = k`` the first ``k`` pairs are used (2 classes = polarity about sport).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedlora.data.rows import Rows

MIN_WORDS, MAX_WORDS = 8, 20
MAX_CLASSES = 8


@dataclass(frozen=True)
class _Topic:
    name: str
    nouns: tuple[str, ...]
    contexts: tuple[str, ...]  # neutral phrases that mention the topic


TOPICS = (
    _Topic(
        "sport",
        ("match", "game", "final", "race", "tournament", "team", "season", "derby"),
        (
            "after football practice",
            "while the players warmed up",
            "between two tennis games",
            "after the cup draw",
        ),
    ),
    _Topic(
        "food",
        ("soup", "pasta", "dessert", "meal", "pizza", "salad", "curry", "breakfast"),
        (
            "during a quick lunch",
            "while we waited for dinner",
            "over coffee and cake",
            "after the cooking class",
        ),
    ),
    _Topic(
        "travel",
        ("flight", "hotel", "trip", "cruise", "tour", "journey", "holiday", "ferry"),
        (
            "on the way to the airport",
            "during our long train ride",
            "while we were on holiday",
            "after we checked in",
        ),
    ),
    _Topic(
        "tech",
        ("phone", "laptop", "app", "camera", "printer", "update", "tablet", "website"),
        (
            "while my phone was charging",
            "after the software update",
            "while i checked my email",
            "before the video call",
        ),
    ),
)
POSITIVE = (
    "good",
    "great",
    "excellent",
    "wonderful",
    "enjoyable",
    "impressive",
    "pleasant",
    "fantastic",
    "lovely",
    "amazing",
)
NEGATIVE = (
    "bad",
    "terrible",
    "awful",
    "boring",
    "disappointing",
    "poor",
    "horrible",
    "dull",
    "annoying",
    "unpleasant",
)
# {np} is the target noun phrase. Affirmative templates keep the adjective's
# polarity (one contains "not" without negating), negated ones flip it.
AFFIRMATIVE = (
    "{np} was {adj}",
    "{np} was really {adj}",
    "{np} turned out to be {adj}",
    "{np} could not have been more {adj}",
    "i found {np} {adj}",
    "{np} felt {adj} from start to finish",
    "everyone said {np} was {adj}",
)
NEGATED = (
    "{np} was not {adj}",
    "{np} was not {adj} at all",
    "{np} was far from {adj}",
    "{np} was anything but {adj}",
    "nobody would call {np} {adj}",
    "i would not say {np} was {adj}",
    "{np} did not feel {adj} to me",
    "{np} was never {adj}",
)
# Below 1/2 so the adjective alone predicts polarity better than chance: at exactly
# 1/2 polarity is an XOR of adjective and negation, with no first-order signal for
# gradient descent to start from, and a LoRA-tuned classifier stalls at the topic.
NEGATION_RATE = 0.25
DETERMINERS = ("the", "our", "this")
OPENERS = (
    "",
    "",
    "honestly,",
    "to be fair,",
    "i think",
    "we all agreed that",
    "my friend said",
    "in the end,",
)
SIDE_SUBJECTS = ("weather", "traffic", "parking", "queue", "music", "lighting")
SIDE_CLAUSES = (
    ", even though the {s} was {adj}",
    ", while the {s} was {adj}",
    " and the {s} was {adj}",
    ", although the {s} was {adj}",
)


def class_names(num_classes: int) -> list[str]:
    """Names ``"topic/polarity"`` of the first ``num_classes`` labels (2..8)."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"data.num_classes={num_classes}: the synthetic task has 2..{MAX_CLASSES} "
            "classes (4 topics x positive/negative)"
        )
    pairs = [(t.name, p) for t in TOPICS for p in ("positive", "negative")]
    return [f"{t}/{p}" for t, p in pairs[:num_classes]]


def make_sentence(rng: random.Random, label: int) -> str:
    """Draw one sentence whose (topic, polarity) pair is class ``label``.

    Parameters
    ----------
    rng : random.Random
        Source of every choice (seeded by the caller).
    label : int
        Class id in ``[0, 8)``: topic ``label // 2``, positive iff ``label`` is even.

    Returns
    -------
    str
        One lower-case sentence ending in a full stop.
    """
    topic, positive = TOPICS[label // 2], label % 2 == 0
    negated = rng.random() < NEGATION_RATE
    core = rng.choice(NEGATED if negated else AFFIRMATIVE)
    # The adjective's own polarity is flipped by negation: XOR gives the label.
    adjectives = POSITIVE if positive != negated else NEGATIVE
    np_ = f"{rng.choice(DETERMINERS)} {rng.choice(topic.nouns)}"
    parts = [rng.choice(OPENERS)]
    if rng.random() < 0.5:
        parts.append(rng.choice(rng.choice(TOPICS).contexts) + ",")
    parts.append(core.format(np=np_, adj=rng.choice(adjectives)))
    text = " ".join(p for p in parts if p)
    if rng.random() < 0.5:
        side = rng.choice(SIDE_CLAUSES)
        text += side.format(
            s=rng.choice(SIDE_SUBJECTS), adj=rng.choice(POSITIVE + NEGATIVE)
        )
    return text + "."


def generate(num_examples: int, num_classes: int, seed: int) -> Rows:
    """Generate the balanced, duplicate-free synthetic classification set.

    Parameters
    ----------
    num_examples : int
        Rows to generate.
    num_classes : int
        Number of classes (2..8), see :func:`class_names`.
    seed : int
        Seed of every random choice; equal seeds give identical datasets.

    Returns
    -------
    Rows
        ``num_examples`` rows ``{"text": str, "label": int}``; labels are balanced
        (counts differ by at most one) and in shuffled order.
    """
    class_names(num_classes)  # validates the range
    rng = random.Random(seed)
    labels = [i % num_classes for i in range(num_examples)]
    rng.shuffle(labels)
    seen: set[str] = set()
    texts: list[str] = []
    for label in labels:
        texts.append(_unique_sentence(rng, label, seen))
    return Rows.from_dict({"text": texts, "label": labels})


def _unique_sentence(rng: random.Random, label: int, seen: set[str]) -> str:
    """Draw until a sentence of allowed length not in ``seen`` comes up; record it."""
    for _ in range(1000):
        text = make_sentence(rng, label)
        if text not in seen and MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            seen.add(text)
            return text
    raise ValueError(
        "could not draw a new synthetic sentence after 1000 tries; "
        "lower data.num_examples"
    )
