"""Deterministic generator of the embedded tiny corpus in ``data/tiny``.

The corpus is ours, built from scratch by the rules in this file, and has structure that a tiny
model learns in minutes on a CPU. Documents mix four tasks:

- ``grammar``: short stories in a tiny English-like grammar (a few hundred word forms) with
  subject-verb agreement (also across relative clauses and through pronouns), a/an before
  vowels, number words with plurals, and verbs that only take fitting subjects and objects;
- ``arithmetic``: ``12 + 7 = 19``, ``45 - 18 = 27``, ``6 * 7 = 42``;
- ``recall``: key-value recall in context, ``k3=apple k9=pear k1=plum ? k3 -> apple``;
- ``lists``: ``sort: 5 2 9 1 -> 1 2 5 9``, ``reverse: ...``, ``max: ...``, ``next: 3 6 9 -> 12``.

Files written to ``--out``:

- ``train.jsonl`` and ``eval.jsonl``: one ``{"text": ...}`` record per line; document lengths are
  log-normal-ish between about 20 and 400 tokens, so sequence packing is exercised;
- ``sft.jsonl``: one ``{"messages": [system, user, assistant, ...]}`` conversation per line, one to
  three turns built from the same tasks (one kind recalls a key given in an earlier turn).

Determinism: record ``i`` of a split depends only on ``(seed, split, i)`` through its own
``random.Random`` seeded by a SHA-256 digest, and the code draws only integers from it (no floats,
so no platform math enters). Any prefix or slice of a split is therefore cheap to regenerate,
and the same seed gives the same bytes on every machine and Python >= 3.10.

Usage::

    python tools/make_corpus.py --out data/tiny --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

DEFAULT_COUNTS = {"train": 9000, "eval": 500, "sft": 1000}
# Document length bounds in estimated tokens (estimate_tokens); the tiny tokenizer gives ~10% more.
MIN_TOKENS, MAX_TOKENS = 20, 360

# --------------------------------------------------------------------------------------------------
# Vocabulary of the grammar. Nouns: singular, plural, category, tags.
# --------------------------------------------------------------------------------------------------


def _nouns(category: str, spec: str) -> list[tuple[str, str, str]]:
    """``"cat fox/foxes sheep/sheep"`` -> [(singular, plural, category), ...]; default plural adds s."""
    out = []
    for item in spec.split():
        sg, _, pl = item.partition("/")
        out.append((sg, pl or sg + "s", category))
    return out


NOUNS = (
    _nouns(
        "animal",
        "cat dog fox/foxes bird horse mouse/mice rabbit wolf/wolves bear owl frog goat sheep/sheep "
        "duck lion tiger eagle otter pony/ponies hen",
    )
    + _nouns(
        "person",
        "farmer teacher child/children doctor baker sailor king queen girl boy woman/women man/men "
        "painter student hunter nurse",
    )
    + _nouns(
        "food",
        "apple pear plum cake cherry/cherries egg carrot berry/berries nut onion orange "
        "peach/peaches melon lemon grape cookie pie potato/potatoes",
    )
    + _nouns(
        "thing",
        "book ball box/boxes cup hat key lamp letter map coin drum kite rope shoe bell boat basket candle chair clock",
    )
)
PLACES = (
    "garden river forest house market hill field kitchen village valley lake barn meadow castle cave "
    "school harbor bridge park tower"
).split()
NAMES = "Anna Tom Lily Max Nora Sam Ella Ben Mia Leo Rosa Finn Ivy Jack Zoe Omar".split()
FLYERS = {"bird", "owl", "eagle", "duck", "hen"}
READABLE = {"book", "letter", "map"}
BUILDABLE = {"box", "boat", "chair", "kite", "basket", "drum", "clock", "lamp"}
ANIMATE = ("animal", "person")

# Adjectives by the categories they describe.
ADJECTIVES = {
    "color": "red blue green yellow brown white black gray".split(),
    "size": "big small tiny old".split(),
    "animate": "happy sad sleepy hungry angry brave quiet busy clever kind lazy proud shy calm young tall".split(),
    "food": "ripe sweet fresh sour juicy soft round".split(),
    "thing": "shiny heavy broken wooden empty new long warm".split(),
}
# Which adjective groups fit which noun category (people are not red; apples are not clever).
ADJECTIVE_GROUPS = {
    "person": ["size", "animate", "animate"],
    "animal": ["color", "size", "animate"],
    "food": ["color", "size", "food"],
    "thing": ["color", "size", "thing"],
}
ADVERBS = "quickly slowly quietly happily loudly often again".split()
PREPOSITIONS = "in near by behind under beside".split()
OPENERS = ["Every morning,", "At night,", "Later,", "Then", "One day,", "Today,", "Again,", "Soon,"]
NUMBER_WORDS = "two three four five six seven eight nine ten".split()

# Verbs: base form, subject categories, object categories (None: intransitive), optional word filters.
# Third person singular is derived by _third_person.
VERBS = [
    ("eat", ANIMATE, ("food",)),
    ("see", ANIMATE, ("animal", "person", "food", "thing")),
    ("like", ANIMATE, ("animal", "person", "food", "thing")),
    ("find", ANIMATE, ("animal", "food", "thing")),
    ("carry", ANIMATE, ("food", "thing")),
    ("chase", ANIMATE, ("animal",)),
    ("watch", ANIMATE, ("animal", "person")),
    ("follow", ANIMATE, ("animal", "person")),
    ("help", ("person",), ("animal", "person")),
    ("read", ("person",), ("read",)),
    ("build", ("person",), ("build",)),
    ("cook", ("person",), ("food",)),
    ("paint", ("person",), ("thing",)),
    ("hold", ("person",), ("food", "thing")),
    ("buy", ("person",), ("food", "thing")),
    ("sell", ("person",), ("food", "thing")),
    ("wash", ("person",), ("thing", "animal")),
    ("hide", ANIMATE, ("food", "thing")),
    ("drop", ANIMATE, ("food", "thing")),
    ("sleep", ANIMATE, None),
    ("run", ANIMATE, None),
    ("sing", ANIMATE, None),
    ("jump", ANIMATE, None),
    ("swim", ANIMATE, None),
    ("rest", ANIMATE, None),
    ("play", ANIMATE, None),
    ("wait", ANIMATE, None),
    ("dance", ("person",), None),
    ("laugh", ("person",), None),
    ("fly", ("fly",), None),
]


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _nouns_for(category: str) -> list[tuple[str, str, str]]:
    if category == "read":
        return [n for n in NOUNS if n[0] in READABLE]
    if category == "build":
        return [n for n in NOUNS if n[0] in BUILDABLE]
    if category == "fly":
        return [n for n in NOUNS if n[0] in FLYERS]
    return [n for n in NOUNS if n[2] == category]


# --------------------------------------------------------------------------------------------------
# Random helpers: integer draws only.
# --------------------------------------------------------------------------------------------------


def record_rng(seed: int, split: str, index: int) -> random.Random:
    """The private random stream of record ``index`` of ``split``."""
    digest = hashlib.sha256(f"veofast-tiny/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def _chance(rng: random.Random, percent: int) -> bool:
    return rng.randrange(100) < percent


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    r = rng.randrange(sum(weights.values()))
    for key, w in weights.items():
        if r < w:
            return key
        r -= w
    raise AssertionError("unreachable")


def _distinct(rng: random.Random, seq, k: int) -> list:
    """``k`` distinct items of ``seq`` in random order (partial Fisher-Yates)."""
    pool = list(seq)
    for i in range(k):
        j = i + rng.randrange(len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


# 2 ** (i / 8) * 100 for i in 0..7, as integers, for the log-normal-ish length.
_OCTAVE_STEPS = [100, 109, 119, 130, 141, 154, 168, 183]


def sample_length(rng: random.Random) -> int:
    """A target length in estimated tokens, log-normal-ish: median ~67, within [MIN_TOKENS, MAX_TOKENS]."""
    eighths = sum(rng.randrange(13) for _ in range(4)) - 10  # ~normal, mean 14, sd ~7.5
    eighths = max(0, min(eighths, 35))
    octave, step = divmod(eighths, 8)
    return min(MAX_TOKENS, (MIN_TOKENS << octave) * _OCTAVE_STEPS[step] // 100)


_TOKEN_RE = re.compile(r"[^\W\d_]+|\d+|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token count: runs of letters, runs of digits and punctuation marks."""
    return len(_TOKEN_RE.findall(text))


# --------------------------------------------------------------------------------------------------
# Task 1: grammar stories.
# --------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: random.Random, noun: tuple[str, str, str], plural: bool, *, definite_bias: int = 50) -> str:
    sg, pl, cat = noun
    adj = ""
    if _chance(rng, 40):
        adj = _pick(rng, ADJECTIVES[_pick(rng, ADJECTIVE_GROUPS[cat])])
    head = pl if plural else sg
    words = [adj, head] if adj else [head]
    if plural:
        det = _pick(rng, ["the", "the", "these", "those", "some", "my", "our", _pick(rng, NUMBER_WORDS)])
    elif _chance(rng, definite_bias):
        det = _pick(rng, ["the", "the", "the", "this", "that", "my", "her", "his"])
    else:
        det = _article(words[0])
    return " ".join([det, *words])


class _Subject:
    """A story's protagonist: its phrase, number, category, pronoun and whether it can fly."""

    def __init__(self, phrase: str, plural: bool, category: str, pronoun: str, flyer: bool):
        self.phrase, self.plural, self.category, self.pronoun, self.flyer = phrase, plural, category, pronoun, flyer


def _subject(rng: random.Random) -> _Subject:
    if _chance(rng, 20):
        return _Subject(_pick(rng, NAMES), False, "person", _pick(rng, ["he", "she"]), False)
    noun = _pick(rng, _nouns_for(_pick(rng, ANIMATE)))
    plural = _chance(rng, 40)
    pronoun = "they" if plural else ("it" if noun[2] == "animal" else _pick(rng, ["he", "she"]))
    phrase = _noun_phrase(rng, noun, plural, definite_bias=75)
    return _Subject(phrase, plural, noun[2], pronoun, noun[0] in FLYERS)


def _verb_phrase(rng: random.Random, who: _Subject, *, transitive_only: bool = False) -> str:
    options = [v for v in VERBS if who.category in v[1] or (who.flyer and v[1] == ("fly",))]
    if transitive_only:
        options = [v for v in options if v[2] is not None]
    base, _, objects = _pick(rng, options)
    verb = base if who.plural else _third_person(base)
    if objects is None:
        parts = [verb]
        if _chance(rng, 35):
            parts.append(_pick(rng, ADVERBS))
        if _chance(rng, 50):
            parts.append(f"{_pick(rng, PREPOSITIONS)} the {_pick(rng, PLACES)}")
        return " ".join(parts)
    obj = _pick(rng, _nouns_for(_pick(rng, objects)))
    parts = [verb, _noun_phrase(rng, obj, _chance(rng, 35))]
    if _chance(rng, 25):
        parts.append(f"{_pick(rng, PREPOSITIONS)} the {_pick(rng, PLACES)}")
    return " ".join(parts)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def grammar_story(rng: random.Random) -> str:
    """A paragraph of 2-6 sentences about one protagonist, with agreement throughout."""
    hero = _subject(rng)
    sentences = []
    for i in range(2 + rng.randrange(5)):
        kind = rng.randrange(10)
        who = hero.phrase if i == 0 or _chance(rng, 40) else hero.pronoun
        if kind < 5:  # subject verb (object)
            text = f"{who} {_verb_phrase(rng, hero)}"
        elif kind < 7:  # copula with an adjective
            be = "are" if hero.plural else "is"
            text = f"{who} {be} {_pick(rng, ADJECTIVES[_pick(rng, ADJECTIVE_GROUPS[hero.category])])}"
        elif kind < 8:  # relative clause: the main verb agrees with the head noun, not the nearer one
            other = _subject(rng) if who == hero.pronoun or who in NAMES else hero
            rel = _verb_phrase(rng, other, transitive_only=True)
            text = f"{other.phrase} that {rel} {_verb_phrase(rng, other)}"
        elif kind < 9:  # there is / there are, with number words
            noun = _pick(rng, NOUNS)
            where = f"{_pick(rng, PREPOSITIONS)} the {_pick(rng, PLACES)}"
            if _chance(rng, 50):
                text = f"there is {_article(noun[0])} {noun[0]} {where}"
            else:
                text = f"there are {_pick(rng, NUMBER_WORDS)} {noun[1]} {where}"
        else:  # opener + clause
            text = f"{_pick(rng, OPENERS)} {who} {_verb_phrase(rng, hero)}"
        sentences.append(_sentence(text))
    return " ".join(sentences)


# --------------------------------------------------------------------------------------------------
# Tasks 2-4: arithmetic, key-value recall, lists.
# --------------------------------------------------------------------------------------------------


def equation(rng: random.Random) -> tuple[str, int]:
    """``("12 + 7", 19)``: sums and differences of 0..99, products of 0..12."""
    op = _weighted(rng, {"+": 4, "-": 3, "*": 3})
    if op == "*":
        a, b = rng.randrange(13), rng.randrange(13)
        return f"{a} * {b}", a * b
    a, b = rng.randrange(100), rng.randrange(100)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b}", a - b
    return f"{a} + {b}", a + b


def arithmetic_block(rng: random.Random) -> str:
    lines = []
    for _ in range(1 + rng.randrange(4)):
        expr, value = equation(rng)
        lines.append(f"{expr} = {value}")
    return "\n".join(lines)


RECALL_VALUES = sorted({n[0] for n in NOUNS if n[2] in ("food", "thing")} | set(ADJECTIVES["color"]))


def recall_pairs(rng: random.Random) -> list[tuple[str, str]]:
    n = 2 + rng.randrange(7)
    keys = _distinct(rng, range(20), n)
    return [(f"k{k}", _pick(rng, RECALL_VALUES)) for k in keys]


def recall_line(rng: random.Random) -> str:
    pairs = recall_pairs(rng)
    text = " ".join(f"{k}={v}" for k, v in pairs)
    for k, v in _distinct(rng, pairs, 1 + rng.randrange(min(2, len(pairs)))):
        text += f" ? {k} -> {v}"
    return text


def list_task(rng: random.Random) -> tuple[str, str, str]:
    """(name, input items, answer) for one list exercise."""
    kind = _weighted(rng, {"sort": 3, "reverse": 2, "max": 1, "min": 1, "count": 1, "next": 2, "sort words": 1})
    n = 3 + rng.randrange(6)
    if kind == "next":
        step, start = 1 + rng.randrange(9), rng.randrange(30)
        seq = [start + step * i for i in range(n + 1)]
        return kind, " ".join(map(str, seq[:-1])), str(seq[-1])
    if kind in ("reverse", "sort words") and (kind == "sort words" or _chance(rng, 50)):
        items = _distinct(rng, RECALL_VALUES, n)
        answer = items[::-1] if kind == "reverse" else sorted(items)
        return kind, " ".join(items), " ".join(answer)
    nums = [rng.randrange(100) for _ in range(n)]
    answers = {
        "sort": " ".join(map(str, sorted(nums))),
        "reverse": " ".join(map(str, nums[::-1])),
        "max": str(max(nums)),
        "min": str(min(nums)),
        "count": str(len(nums)),
    }
    return kind, " ".join(map(str, nums)), answers[kind]


def list_block(rng: random.Random) -> str:
    lines = []
    for _ in range(1 + rng.randrange(3)):
        kind, items, answer = list_task(rng)
        lines.append(f"{kind}: {items} -> {answer}")
    return "\n".join(lines)


TASKS = {"grammar": grammar_story, "arithmetic": arithmetic_block, "recall": recall_line, "lists": list_block}


# --------------------------------------------------------------------------------------------------
# Records.
# --------------------------------------------------------------------------------------------------


def make_document(seed: int, split: str, index: int) -> str:
    """Document ``index`` of ``split``: segments of one task or a mix, one segment per line."""
    rng = record_rng(seed, split, index)
    target = sample_length(rng)
    mode = rng.randrange(10)
    if mode < 4:
        weights = {"grammar": 1}
    elif mode < 5:
        weights = {"arithmetic": 1}
    elif mode < 6:
        weights = {"recall": 1}
    elif mode < 7:
        weights = {"lists": 1}
    else:
        weights = {"grammar": 4, "arithmetic": 2, "recall": 2, "lists": 2}
    segments: list[str] = []
    total = 0
    while total < target:
        segment = TASKS[_weighted(rng, weights)](rng)
        cost = estimate_tokens(segment) + 1
        if segments and total + cost > MAX_TOKENS:
            break
        segments.append(segment)
        total += cost
    return "\n".join(segments)


SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a careful assistant. Answer briefly.",
    "You are a tutor for arithmetic, lists and simple sentences.",
]


def _fix_agreement_turn(rng: random.Random) -> tuple[str, str]:
    who = _subject(rng)
    base, _, objects = _pick(rng, [v for v in VERBS if who.category in v[1] and v[2] is not None])
    obj = _pick(rng, _nouns_for(_pick(rng, objects)))
    rest = _noun_phrase(rng, obj, _chance(rng, 35))
    right, wrong = (base, _third_person(base)) if who.plural else (_third_person(base), base)
    return (
        f"Fix the verb: {_sentence(f'{who.phrase} {wrong} {rest}')}",
        _sentence(f"{who.phrase} {right} {rest}"),
    )


def _chat_turns(rng: random.Random) -> list[tuple[str, str]]:
    """One to three (user, assistant) turns; a recall conversation asks in a later turn."""
    kind = _weighted(rng, {"arithmetic": 3, "lists": 3, "recall": 2, "grammar": 2, "plural": 1, "story": 1})
    if kind == "recall":
        pairs = recall_pairs(rng)
        turns = [(f"Remember these: {' '.join(f'{k}={v}' for k, v in pairs)}", "Done.")]
        for k, v in _distinct(rng, pairs, 1 + rng.randrange(min(2, len(pairs)))):
            turns.append((f"What is {k}?", f"{k} is {v}."))
        return turns
    if kind == "arithmetic":
        expr, value = equation(rng)
        return [(_pick(rng, [f"What is {expr}?", f"Compute {expr}.", f"{expr} = ?"]), f"{expr} = {value}")]
    if kind == "lists":
        name, items, answer = list_task(rng)
        prompts = {
            "sort": "Sort these numbers: ",
            "reverse": "Reverse this list: ",
            "max": "What is the largest of ",
            "min": "What is the smallest of ",
            "count": "How many items are in ",
            "next": "What comes next: ",
            "sort words": "Put these words in order: ",
        }
        return [(prompts[name] + items + ("?" if name in ("max", "min", "count", "next") else ""), answer)]
    if kind == "grammar":
        return [_fix_agreement_turn(rng)]
    if kind == "plural":
        sg, pl, _ = _pick(rng, NOUNS)
        return [(f"What is the plural of {sg}?", f"The plural of {sg} is {pl}.")]
    story = grammar_story(rng)
    return [("Tell me a short story.", story)]


def make_conversation(seed: int, index: int) -> list[dict[str, str]]:
    """Conversation ``index`` of the SFT split: a system message, then 1-3 user/assistant turns."""
    rng = record_rng(seed, "sft", index)
    messages = [{"role": "system", "content": _pick(rng, SYSTEM_PROMPTS)}]
    n_topics = 1 + rng.randrange(3)
    while n_topics > 0 and len(messages) < 7:
        for user, assistant in _chat_turns(rng):
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant})
        n_topics -= 1
    return messages


def make_record(seed: int, split: str, index: int) -> dict:
    if split == "sft":
        return {"messages": make_conversation(seed, index)}
    return {"text": make_document(seed, split, index)}


def record_line(record: dict) -> str:
    """The exact JSON line a record is stored as."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def iter_records(split: str, *, seed: int = 0, start: int = 0, count: int) -> Iterator[dict]:
    """Records ``start .. start+count-1`` of ``split`` (``train``, ``eval`` or ``sft``)."""
    if split not in DEFAULT_COUNTS:
        raise ValueError(f"split must be one of {sorted(DEFAULT_COUNTS)}, got {split!r}")
    for index in range(start, start + count):
        yield make_record(seed, split, index)


def _write_atomic(path: Path, lines: Iterator[str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_corpus(out_dir: str | os.PathLike, *, seed: int = 0, counts: dict[str, int] | None = None) -> dict[str, Path]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``sft.jsonl`` into ``out_dir``; returns their paths.

    ``counts`` overrides the number of records per split (``DEFAULT_COUNTS`` otherwise).
    """
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    for split, n in counts.items():
        if split not in DEFAULT_COUNTS:
            raise ValueError(f"counts: unknown split {split!r}; expected {sorted(DEFAULT_COUNTS)}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"counts[{split!r}] must be a non-negative int, got {n!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in counts.items():
        path = out / f"{split}.jsonl"
        _write_atomic(path, (record_line(r) for r in iter_records(split, seed=seed, count=n)))
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/tiny", help="output directory (default: data/tiny)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default: 0, the shipped corpus)")
    for split, n in DEFAULT_COUNTS.items():
        parser.add_argument(f"--num-{split}", type=int, default=n, help=f"{split} records (default: {n})")
    args = parser.parse_args(argv)
    counts = {split: getattr(args, f"num_{split}") for split in DEFAULT_COUNTS}
    for split, path in write_corpus(args.out, seed=args.seed, counts=counts).items():
        print(f"{path}: {counts[split]} records, {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
