"""Seeded synthetic product reviews, labelled positive, negative or neutral.

The data behind the small trained demo model (``models/reviews-tiny``, built by
``tools/train_demo_model.py``) and the bundled example dataset
(``prompts/examples/reviews.{jsonl,parquet}``). Everything here is pure Python
with a seeded ``random.Random``: the same ``(n, seed)`` gives the same reviews on
every machine.

A review is a few sentences built from word lists and phrase patterns. Its
label follows from its parts by a fixed rule, so a small model can learn it:

* Each opinion *clause* has a polarity: positive, negative or neutral.
  Intensifiers ("really", "a bit") keep the polarity; a negation flips it
  ("not bad" is positive, "not worth the money" is negative) and "not great,
  not terrible" is neutral.
* Filler sentences ("Bought it for my sister.") carry no opinion.
* A verdict sentence ("Overall, I would recommend it.") decides the label.
* Otherwise a contrast decides: in "A, but B", "A. However, B." and
  "Although A, B." the label is B's polarity.
* Otherwise clauses of one polarity (with or without neutral ones) give that
  polarity; positive and negative clauses side by side without a contrast word
  ("the sound is great and the battery is awful") are *mixed*: neutral. Only
  neutral clauses: neutral.

Second task, for generation demos: :func:`make_generation_examples` pairs a
product and a sentiment with a one-sentence review of it
(:data:`GENERATION_PROMPT`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = [
    "CLASSIFY_PROMPT",
    "GENERATION_PROMPT",
    "LABELS",
    "PRODUCTS",
    "classify_prompt",
    "generation_prompt",
    "make_generation_examples",
    "make_reviews",
]

LABELS = ("positive", "negative", "neutral")

# The prompt the demo model is trained on and the default labeling job renders.
CLASSIFY_PROMPT = "Review: {text}\nSentiment:"
# The one-sentence review generation task.
GENERATION_PROMPT = "Write a one-sentence {label} review of the {product}.\nReview:"

POS, NEG, NEU = 1, -1, 0
_LABEL_OF = {POS: "positive", NEG: "negative", NEU: "neutral"}
_POLARITY_OF = {v: k for k, v in _LABEL_OF.items()}

# --- word lists -------------------------------------------------------------
# fmt: off

_GENERIC_ASPECTS = [
    "price", "quality", "design", "delivery", "packaging", "customer service",
    "instructions", "build quality", "finish", "warranty",
]

_CATEGORIES: dict[str, tuple[list[str], list[str]]] = {
    "electronics": (
        [
            "headphones", "wireless earbuds", "bluetooth speaker", "smartwatch", "phone charger",
            "keyboard", "gaming mouse", "monitor", "webcam", "router", "tablet", "e-reader",
            "power bank", "drone", "printer",
        ],
        ["battery", "sound", "screen", "setup", "app", "connection", "charging", "controls"],
    ),
    "kitchen": (
        [
            "blender", "coffee maker", "toaster", "kettle", "air fryer", "frying pan",
            "microwave", "knife set", "rice cooker", "water bottle", "lunch box",
        ],
        ["lid", "handle", "heating", "cleanup", "capacity", "coating", "noise level"],
    ),
    "apparel": (
        [
            "rain jacket", "running shoes", "hiking boots", "wool sweater", "backpack",
            "sunglasses", "wallet", "winter gloves", "t-shirt",
        ],
        ["fit", "fabric", "stitching", "color", "sizing", "zipper", "comfort"],
    ),
    "home": (
        [
            "office chair", "desk lamp", "mattress", "vacuum cleaner", "air purifier",
            "bookshelf", "yoga mat", "suitcase", "umbrella", "tent", "cordless drill",
            "board game", "hair dryer", "electric toothbrush",
        ],
        ["assembly", "stability", "cushioning", "motor", "suction", "brightness", "weight"],
    ),
}

PRODUCTS: list[str] = [p for products, _ in _CATEGORIES.values() for p in products]
_CATEGORY_OF = {p: c for c, (products, _) in _CATEGORIES.items() for p in products}

_ADJ = {
    POS: [
        "great", "excellent", "amazing", "fantastic", "wonderful", "superb", "solid",
        "impressive", "outstanding", "perfect", "lovely", "brilliant", "top-notch", "good",
    ],
    NEG: [
        "terrible", "awful", "horrible", "poor", "disappointing", "flimsy", "useless",
        "bad", "dreadful", "shoddy", "frustrating", "subpar", "faulty",
    ],
    NEU: [
        "okay", "average", "fine", "acceptable", "standard", "ordinary", "adequate",
        "so-so", "unremarkable", "typical",
    ],
}

# Adjectives that read naturally after "not"; "not X" has the opposite polarity.
_NEGATABLE = {
    POS: ["great", "good", "reliable", "sturdy", "impressive", "comfortable", "worth it"],
    NEG: ["bad", "disappointing", "flimsy", "faulty", "a problem", "an issue"],
}

_INTENSIFIERS = {
    POS: ["", "", "", "very ", "really ", "extremely ", "incredibly ", "truly ", "super ",
          "absolutely ", "pretty ", "quite "],
    NEG: ["", "", "", "very ", "really ", "extremely ", "incredibly ", "truly ", "super ",
          "absolutely ", "pretty ", "quite ", "a bit ", "somewhat "],
    NEU: ["", "", "", "just ", "pretty ", "fairly ", "rather ", "mostly "],
}

_NOT_BEFORE_NOUN = {"a bit ", "somewhat ", "just ", "mostly "}

_VERBS = {
    POS: ["love", "adore", "really like", "enjoy using", "am happy with", "am impressed by"],
    NEG: ["hate", "regret buying", "can't stand", "am unhappy with", "am disappointed by",
          "gave up on"],
    NEU: ["have mixed feelings about", "have no strong feelings about", "don't mind",
          "have used"],
}

_IDIOMS = {
    POS: [
        "would buy it again", "I highly recommend it", "it is worth every penny",
        "it exceeded my expectations", "no complaints at all", "it works like a charm",
        "I use it every day and love it", "best purchase this year",
        "a total win", "my family loves it",
    ],
    NEG: [
        "would not recommend it", "it was a waste of money", "I returned it after a week",
        "it broke after two days", "it stopped working after a month",
        "it fell apart quickly", "a total letdown", "never buying this brand again",
        "it arrived damaged", "it does not work as advertised",
    ],
    NEU: [
        "it does the job", "nothing special", "it works as described",
        "about what you would expect for the price", "it is what it is",
        "it is middle of the road", "neither good nor bad", "it is an average product",
        "no strong opinion either way", "it does what it says, nothing more",
    ],
}

# Negation phrases that are not "not + adjective": their polarity is given.
_NEGATED_IDIOMS = {
    POS: [
        "I could not be happier", "I have nothing to complain about", "no problems so far",
        "it never lets me down", "I can't fault it",
    ],
    NEG: [
        "it is not worth the money", "it did not work out of the box", "it never works properly",
        "I can't recommend it", "it is not what I expected",
    ],
    NEU: [
        "not great, not terrible", "not bad but not great either", "not the best, not the worst",
    ],
}

_VERDICTS = {
    POS: [
        "I would recommend it", "I am happy with it", "it is a great buy", "I am satisfied",
        "it is a good {product}", "I like it",
    ],
    NEG: [
        "I would not buy it again", "it is a disappointment", "I am not satisfied",
        "it is a bad {product}", "I regret it", "avoid it",
    ],
    NEU: [
        "it is just okay", "it is an average {product}", "it is fine, nothing more",
        "I have no strong feelings about it", "it is neither good nor bad",
    ],
}

_VERDICT_OPENERS = ["Overall, ", "All in all, ", "In the end, ", "Bottom line: ", "To sum up, "]

_FILLERS = [
    "Bought this for my {person}.", "Got it last {period}.", "I have had it for {n} {unit}.",
    "Ordered the {color} one.", "It was a gift for my {person}.", "I use it mostly at {place}.",
    "This is my second {product}.", "Bought it on sale.", "It arrived on {day}.",
    "I needed a new {product}.", "I compared a few before buying.",
]
_FILL = {
    "person": ["sister", "brother", "mom", "dad", "wife", "husband", "son", "daughter",
               "friend", "roommate"],
    "period": ["week", "month", "year", "summer", "winter"],
    "n": ["two", "three", "six", "a few", "several"],
    "unit": ["weeks", "months", "days"],
    "color": ["black", "white", "blue", "red", "green", "gray"],
    "place": ["home", "work", "the gym", "school", "the office"],
    "day": ["Monday", "Tuesday", "Friday", "Saturday", "time"],
}

_SOURCES = ["web", "app", "email", "store"]
_TAG_POOL = ["verified", "gift", "repeat-buyer", "discounted", "long-term", "first-order"]
_EPOCH = datetime(2024, 1, 1)  # created_at values are naive UTC

# Plural nouns: "these headphones are".
_PLURAL = {
    "headphones", "wireless earbuds", "running shoes", "hiking boots", "sunglasses",
    "winter gloves", "instructions", "controls",
}
# fmt: on


# --- building blocks --------------------------------------------------------


@dataclass
class _Clause:
    text: str  # lower-case start, no final punctuation
    polarity: int


def _subject(rng: random.Random, product: str) -> str:
    aspects = _GENERIC_ASPECTS + _CATEGORIES[_CATEGORY_OF[product]][1]
    r = rng.random()
    if r < 0.45:
        return f"the {rng.choice(aspects)}"
    if r < 0.75:
        return f"the {product}"
    if r < 0.9:
        return "it"
    return f"{_this(product)} {product}"


def _this(product: str) -> str:
    return "these" if product in _PLURAL else "this"


def _be(subject: str) -> str:
    noun = subject.split(" ", 1)[-1]
    return "are" if noun in _PLURAL else "is"


def _clause(rng: random.Random, polarity: int, product: str, joined: bool = False) -> _Clause:
    """One opinion clause of the given polarity.

    ``joined`` clauses are part of a longer sentence: no bare noun phrases
    ("a great blender") and no idioms with commas in them.
    """
    kinds = ["adjective", "negation", "negated-idiom", "verb", "noun-phrase", "idiom"]
    weights = [
        0.42,
        0.15 if polarity != NEU else 0.0,
        0.07 if polarity != NEU else 0.04,
        0.12,
        0.0 if joined else 0.10,
        0.14,
    ]
    if joined and polarity == NEU:
        weights[2] = 0.0
    kind = rng.choices(kinds, weights=weights)[0]
    if kind == "adjective":  # "the battery is really great"
        subj = _subject(rng, product)
        adj = rng.choice(_ADJ[polarity])
        return _Clause(f"{subj} {_be(subj)} {rng.choice(_INTENSIFIERS[polarity])}{adj}", polarity)
    if kind == "negation":  # "the lid is not great": negative; "not bad": positive
        subj = _subject(rng, product)
        adj = rng.choice(_NEGATABLE[-polarity])
        be = _be(subj)
        form = rng.random()
        if form < 0.15:
            return _Clause(f"{subj} {be} never {adj}", polarity)
        if form < 0.25 and -polarity == POS and not adj.startswith("worth"):
            return _Clause(f"{subj} {be} not very {adj}", polarity)
        at_all = " at all" if rng.random() < 0.25 else ""
        if form < 0.55:
            return _Clause(f"{subj} {be}n't {adj}{at_all}", polarity)
        return _Clause(f"{subj} {be} not {adj}{at_all}", polarity)
    if kind == "negated-idiom":
        return _Clause(rng.choice(_NEGATED_IDIOMS[polarity]), polarity)
    if kind == "verb":  # "I love this blender"
        obj = rng.choice([f"{_this(product)} {product}", "it", f"the {product}"])
        return _Clause(f"I {rng.choice(_VERBS[polarity])} {obj}", polarity)
    if kind == "noun-phrase":  # "a really great blender"
        inten = rng.choice([i for i in _INTENSIFIERS[polarity] if i not in _NOT_BEFORE_NOUN])
        word = f"{inten}{rng.choice(_ADJ[polarity])}"
        art = "" if product in _PLURAL else ("an " if word[0] in "aeiou" else "a ")
        return _Clause(f"{art}{word} {product}", polarity)
    return _Clause(rng.choice(_IDIOMS[polarity]), polarity)


def _two(rng: random.Random, pa: int, pb: int, product: str) -> tuple[_Clause, _Clause]:
    """Two different joined clauses."""
    a = _clause(rng, pa, product, joined=True)
    b = _clause(rng, pb, product, joined=True)
    while b.text == a.text:
        b = _clause(rng, pb, product, joined=True)
    return a, b


def _sentence(text: str, rng: random.Random, polarity: int) -> str:
    end = "!" if polarity != NEU and rng.random() < 0.2 else "."
    return text[0].upper() + text[1:] + end


def _filler(rng: random.Random, product: str) -> str:
    pattern = rng.choice(_FILLERS)
    values = {k: rng.choice(v) for k, v in _FILL.items()}
    return pattern.format(product=product, **values)


def _other(rng: random.Random, polarity: int) -> int:
    return rng.choice([p for p in (POS, NEG) if p != polarity])


def _pair(rng: random.Random, pa: int, pb: int, product: str, joiners: list[str]) -> list[str]:
    """Two clauses, as one sentence ("a and b") or as two ("A. B.")."""
    joiner = rng.choice(joiners)
    if joiner == ". ":
        a = _clause(rng, pa, product)
        b = _clause(rng, pb, product)
        while b.text == a.text:
            b = _clause(rng, pb, product)
        return [_sentence(a.text, rng, pa), _sentence(b.text, rng, pb)]
    a, b = _two(rng, pa, pb, product)
    polarity = pa if pa == pb else NEU
    return [_sentence(a.text + joiner + b.text, rng, polarity)]


def _review(rng: random.Random, label: int, product: str) -> tuple[str, str]:
    """Builds one review with the given label; returns (text, structure)."""
    structure = rng.choices(
        ["single", "agree", "contrast", "mixed", "verdict"],
        weights=[0.3, 0.22, 0.2 if label != NEU else 0.0, 0.2 if label == NEU else 0.0, 0.18],
    )[0]
    sentences: list[str]
    if structure == "single":
        sentences = [_sentence(_clause(rng, label, product).text, rng, label)]
    elif structure == "agree":
        # Same polarity twice, or one opinion and one neutral remark.
        other = label if (label == NEU or rng.random() < 0.6) else NEU
        pa, pb = (label, other) if rng.random() < 0.5 else (other, label)
        sentences = _pair(rng, pa, pb, product, [" and ", ", and ", "; ", ". ", ", also "])
    elif structure == "contrast":
        # The clause after the contrast word decides.
        first = _other(rng, label) if rng.random() < 0.8 else NEU
        a, b = _two(rng, first, label, product)
        form = rng.random()
        if form < 0.5:
            sentences = [_sentence(f"{a.text}, but {b.text}", rng, label)]
        elif form < 0.75:
            sentences = [_sentence(a.text, rng, first), _sentence(f"however, {b.text}", rng, label)]
        else:
            sentences = [_sentence(f"although {a.text}, {b.text}", rng, label)]
    elif structure == "mixed":
        # A positive and a negative clause with no contrast word: neutral.
        pa, pb = (POS, NEG) if rng.random() < 0.5 else (NEG, POS)
        sentences = _pair(rng, pa, pb, product, [" and ", ", and ", "; ", ". "])
    else:  # verdict: any body, then a verdict sentence that decides
        if rng.random() < 0.4:
            pa, pb = (POS, NEG) if rng.random() < 0.5 else (NEG, POS)
            sentences = _pair(rng, pa, pb, product, [" and ", "; ", ". "])
        else:
            body = rng.choice([POS, NEG, NEU])
            sentences = [_sentence(_clause(rng, body, product).text, rng, body)]
        verdict = rng.choice(_VERDICTS[label]).format(product=product)
        sentences.append(rng.choice(_VERDICT_OPENERS) + verdict + ".")
    # Opinion-free filler before or after.
    r = rng.random()
    if r < 0.25:
        sentences.insert(0, _filler(rng, product))
    elif r < 0.35 and structure != "verdict":
        sentences.append(_filler(rng, product))
    text = " ".join(sentences)
    if rng.random() < 0.08:
        text = text.lower()
    return text, structure


def _meta(rng: random.Random, label: str, product: str) -> dict:
    ratings = {"positive": [4, 5, 5], "negative": [1, 1, 2], "neutral": [3]}
    rating = rng.choice(ratings[label])
    tags = sorted(rng.sample(_TAG_POOL, rng.choice([0, 1, 1, 2, 3])))
    if rng.random() < 0.5:
        tags.append(_CATEGORY_OF[product])
    # Whole seconds: JSON readers (pyarrow) infer "YYYY-MM-DDTHH:MM:SS" as a timestamp.
    created = _EPOCH + timedelta(days=rng.randrange(540), seconds=rng.randrange(86400))
    return {
        "tags": tags,
        "meta": {"source": rng.choice(_SOURCES), "rating": rating},
        "created_at": created,
    }


# --- public API -------------------------------------------------------------


def make_reviews(n: int, seed: int = 0) -> list[dict]:
    """``n`` reviews, labels balanced in expectation, reproducible from ``seed``.

    Each row: ``text``, ``label`` (positive | negative | neutral), ``product``,
    ``category``, ``structure`` (single | agree | contrast | mixed | verdict),
    ``tags`` (list of str), ``meta`` (``{"source": str, "rating": int}``) and
    ``created_at`` (a naive ``datetime`` in UTC, whole seconds, 2024-01-01 to mid-2025).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice([POS, NEG, NEU])
        product = rng.choice(PRODUCTS)
        text, structure = _review(rng, label, product)
        name = _LABEL_OF[label]
        rows.append(
            {
                "text": text,
                "label": name,
                "product": product,
                "category": _CATEGORY_OF[product],
                "structure": structure,
                **_meta(rng, name, product),
            }
        )
    return rows


def classify_prompt(text: str) -> str:
    """The sentiment prompt the demo model is trained on."""
    return CLASSIFY_PROMPT.format(text=text)


def generation_prompt(product: str, label: str) -> str:
    """The one-sentence review generation prompt."""
    return GENERATION_PROMPT.format(product=product, label=label)


def make_generation_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` (product, sentiment) -> one-sentence review examples.

    Each row: ``product``, ``label``, ``prompt`` (:data:`GENERATION_PROMPT`
    rendered) and ``target`` (the review, one sentence, with a leading space
    so that ``prompt + target`` reads naturally).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        polarity = rng.choice([POS, NEG, NEU])
        product = rng.choice(PRODUCTS)
        label = _LABEL_OF[polarity]
        kind = rng.random()
        if kind < 0.6:
            text = _sentence(_clause(rng, polarity, product).text, rng, polarity)
        elif kind < 0.85 or polarity == NEU:
            a, b = _two(rng, polarity, polarity, product)
            text = _sentence(f"{a.text} and {b.text}", rng, polarity)
        else:
            a, b = _two(rng, _other(rng, polarity), polarity, product)
            text = _sentence(f"{a.text}, but {b.text}", rng, polarity)
        rows.append(
            {
                "product": product,
                "label": label,
                "prompt": generation_prompt(product, label),
                "target": " " + text,
            }
        )
    return rows
