"""Tasks: instruction + input -> response text, their loaders, and batching.

A `Task` is a list of train and held-out examples `{"instruction", "input", "response"}`,
with verbalizers (the allowed label words) when it is a classification task.

Where the data comes from:
* built-in tasks read the real datasets from a local data folder (`--data-dir`,
  default `../shared/data`): `sst2`, `agnews`, `agnews_title`;
* the project's own suite (`suite_sentiment`, `suite_topic`, `suite_struct`) ships
  in `assets/suite/` for offline demos and tests;
* any CSV / TSV / JSONL file with a text column and a label (or response) column;
* the hub, for users online: `hub:NAME[:CONFIG]` goes through `datasets.load_dataset`
  (NAME must be a hub id, `name` or `owner/name`: never a local path).

Local files are read with the standard `csv` and `json` modules (exact quoting control,
no cache written); `datasets` is used for the hub.

Sequence layout: [CLS] instruction [SEP] input [SEP] response [SEP] [SEP] ... where the
response part has a fixed length per task and is filled with [SEP] after the answer,
so the sampler knows how many positions to generate (LLaDA pads with EOS the same way).
"""

from __future__ import annotations

import codecs
import csv
import json
import numbers
import os
import random
import re
import sys
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from .errors import UserError, cut, quoted
from .paths import SUITE_DIR, default_data_dir

SPLIT_SEED = 0  # held-out carving and eval subsets: the same for every training seed

# The instructions and label words of the built-in tasks (the real datasets and the suite).
SENTIMENT_INSTRUCTION = "is the sentiment of this review positive or negative ?"  # sst2, suite_sentiment
SENTIMENT_LABELS = ("positive", "negative")
AGNEWS_TOPIC_INSTRUCTION = "what is the topic of this news article ? answer world , sports , business or science ."
AGNEWS_TITLE_INSTRUCTION = "write a title for this news article ."
SUITE_TOPIC_INSTRUCTION = "what is the topic of this text ? answer sports , food , weather or music ."
SUITE_TOPIC_LABELS = ("sports", "food", "weather", "music")
SUITE_STRUCT_INSTRUCTION = "extract the colour , the object and the place ."
SUITE_TASKS = ("suite_sentiment", "suite_topic", "suite_struct")
# Other wordings of the built-in instructions, for the router (router.train_router):
# it trains on the "train" ones and is scored on the "heldout" ones, never seen in training.
PARAPHRASES = {
    "sst2": {
        "train": ["does this review sound positive or negative ?",
                  "tell me whether this movie review is positive or negative .",
                  "classify the sentiment of the following review as positive or negative .",
                  "was the reviewer happy or unhappy ? answer positive or negative .",
                  "sentiment of this text , positive or negative ?"],
        "heldout": ["how does the writer feel about the film : positive or negative ?",
                    "decide if the opinion below is positive or negative .",
                    "is this a favourable or an unfavourable review ? say positive or negative ."],
    },
    "agnews": {
        "train": ["which section of the newspaper does this story belong to : world , sports , business or science ?",
                  "classify this news story as world , sports , business or science .",
                  "what kind of news is this ? world , sports , business or science .",
                  "give the category of this article : world , sports , business or science .",
                  "topic of this news text ? answer world , sports , business or science ."],
        "heldout": ["is this article about world news , sports , business or science ?",
                    "label the news item with one of world , sports , business , science .",
                    "which of world , sports , business or science fits this report best ?"],
    },
    "agnews_title": {
        "train": ["give this news story a headline .",
                  "what would be a good headline for this article ?",
                  "write the headline of the following news text .",
                  "summarize this article as a short title .",
                  "suggest a title for this news report ."],
        "heldout": ["come up with a headline for the story below .",
                    "what title would a newspaper give this text ?",
                    "compose a short headline for this news item ."],
    },
    # The built-in suite (suite_sentiment shares SST-2's wording, so it reuses its paraphrases).
    "suite_topic": {
        "train": ["which topic is this text about : sports , food , weather or music ?",
                  "classify this sentence as sports , food , weather or music .",
                  "give the subject of this text : sports , food , weather or music .",
                  "what is this about ? answer sports , food , weather or music .",
                  "topic of the sentence ? sports , food , weather or music ."],
        "heldout": ["is this text about sports , food , weather or music ?",
                    "label the subject of the sentence with sports , food , weather or music .",
                    "which of sports , food , weather or music does this talk about ?"],
    },
    "suite_struct": {
        "train": ["list the colour , the object and the place .",
                  "find the colour , the object and the place in this sentence .",
                  "pull out the colour , object and place mentioned .",
                  "which colour , object and place does the text mention ?",
                  "name the colour , the object and the place ."],
        "heldout": ["tell me the colour , the thing and the location in this sentence .",
                    "what colour , object and place appear below ?",
                    "identify the colour , object and place ."],
    },
}
PARAPHRASES["suite_sentiment"] = PARAPHRASES["sst2"]
AGNEWS_LABELS = {"1": "world", "2": "sports", "3": "business", "4": "science",
                 "world": "world", "sports": "sports", "business": "business", "sci/tech": "science"}


@dataclass
class Task:
    name: str
    kind: str                        # "classification" or "generation"
    train: list[dict]
    eval: list[dict]
    labels: list[str] | None = None  # verbalizers, for classification
    source: str = ""
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"task": self.name, "kind": self.kind, "labels": self.labels, "source": self.source,
                "n_train": len(self.train), "n_eval": len(self.eval), **self.info}


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------

CSV_FIELD_LIMIT = 1_000_000  # characters in one CSV field; the csv module's own default is 131,072
csv.field_size_limit(CSV_FIELD_LIMIT)  # once, for the process: a per-read change would race between threads
MISSING_LABELS = {"", "nan", "null"}  # compared lowercased: what spreadsheets and pandas write for "no value"


class Row(dict):
    """A row of a data file that remembers where it was read, for error messages."""

    __slots__ = ("path", "line")

    def __init__(self, values, path, line: int):
        super().__init__(values)
        self.path, self.line = path, line


def _listing(words, limit: int = 12) -> str:
    """'a, b, c' of at most `limit` names (each cut short), then how many there are."""
    words = [w if w.isprintable() else repr(w) for w in map(cut, words)]  # one line, always
    more = f", ... ({len(words)} in all)" if len(words) > limit else ""
    return ", ".join(words[:limit]) + more


def _at(path, line: int | None) -> str:
    """'file line N': where a message points."""
    return f"{path} line {line}" if line else str(path)


def _place(row, index: int, where) -> str:
    """Where a row came from: its file and line, else its position in `where` (hub rows)."""
    if isinstance(row, Row):
        return _at(row.path, row.line)
    return f"row {index + 1} of {where}"


def _first_bad_byte(path: Path) -> int:
    """Offset of the first byte of `path` that is not valid UTF-8 (read in chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return offset - pending + err.start
            offset += len(chunk)
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            return offset - pending + err.start
    return offset


@contextmanager
def _utf8_text(path: Path):
    """`path` opened as UTF-8 text (a BOM is dropped); unreadable or non-UTF-8 files are a UserError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield f
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (first bad byte at offset {_first_bad_byte(path)}); "
                        "save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def _no_nul(text: str, path, line: int) -> None:
    if "\x00" in text:  # valid UTF-8, yet not text: UTF-16 without a BOM, or a binary file
        raise UserError(f"{_at(path, line)} contains a NUL byte: a binary or UTF-16 file? save it as UTF-8 text")


def _csv_records(path: Path, fmt: str):
    """(first line, fields) of each CSV / TSV record that is not blank."""
    with _utf8_text(path) as f:
        if fmt == "tsv":  # PTB-style text (SST-2) contains bare quotes: no quoting in TSV
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        start = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                if "field limit" in str(err):
                    raise UserError(f"{_at(path, reader.line_num)} has a field longer than {CSV_FIELD_LIMIT:,} "
                                    "characters; shorten it (or close a quote left open)") from None
                raise UserError(f"{_at(path, reader.line_num)} is not valid {fmt.upper()} ({err})") from None
            text = "".join(fields)
            if text.strip():  # skip blank lines and rows of empty cells
                _no_nul(text, path, start)
                yield start, fields, reader.line_num
            start = reader.line_num + 1


def _check_names(names: list[str], where: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise UserError(f"{where} names column {quoted(name)} twice; column names must be distinct")
        seen.add(name)


def _csv_rows(path: Path, fmt: str, columns: list[str] | None):
    """Rows of a CSV / TSV file; each must have one field per column of the header (or `columns`)."""
    records = _csv_records(path, fmt)
    if columns:
        header, expected = columns, f"{len(columns)} columns were given ({_listing(columns)})"
    else:
        first = next(records, None)
        if first is None:
            return
        header = [name.strip() for name in first[1]]
        expected = f"the header has {len(header)}"
    _check_names(header, f"the header of {path}" if not columns else "the column list")
    for start, fields, end in records:
        if len(fields) != len(header):
            hint = ("values cannot contain tabs" if fmt == "tsv" else
                    f"a quoted value runs on to line {end}: is a closing quote missing?" if end > start else
                    "put double quotes around values that contain a comma")
            count = f"{len(fields)} field" + ("s" if len(fields) != 1 else "")
            raise UserError(f"{_at(path, start)} has {count} but {expected}; {hint}")
        yield Row(zip(header, fields), path, start)


JSON_TYPES = {"list": "list", "str": "string", "int": "number", "float": "number", "bool": "true/false",
              "NoneType": "null"}


def _json_error(err: ValueError) -> str:
    """Why json.loads refused a line, in a few words on one line."""
    if isinstance(err, json.JSONDecodeError):
        return err.msg
    if "integer string conversion" in str(err):
        return (f"a number of more than {sys.get_int_max_str_digits():,} digits; "
                "write it as a string, in quotes")
    return cut(" ".join(str(err).split()), 80)


def _json_rows(path: Path):
    """Rows of a JSONL file: one JSON object per line."""
    with _utf8_text(path) as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as err:  # JSONDecodeError, or an integer past Python's int-string limit
                raise UserError(f"{_at(path, line)} is not valid JSON ({_json_error(err)})") from None
            except RecursionError:
                raise UserError(f"{_at(path, line)} is JSON nested too deeply") from None
            if not isinstance(row, dict):
                kind = JSON_TYPES.get(type(row).__name__, type(row).__name__)
                raise UserError(f"{_at(path, line)} is a JSON {kind}, not an object; JSONL needs one object "
                                'per line, like {"text": ..., "label": ...}')
            yield Row(row, path, line)


def read_table(path, columns: list[str] | None = None, fmt: str | None = None,
               max_rows: int | None = None) -> list[dict]:
    """Rows of a CSV / TSV / JSONL file as dicts. `columns` names a headerless file's columns.

    Each row is a `Row`: a dict that knows its file and line. Reading stops with a UserError
    at the first row past `max_rows`, so a huge file is never held in memory.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if not path.is_file():
        raise UserError(f"{path} is not a regular file (a folder, device or pipe?); "
                        "give a CSV, TSV or JSONL file")
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt in ("jsonl", "json"):
        rows = _json_rows(path)
    elif fmt in ("csv", "tsv"):
        rows = _csv_rows(path, fmt, columns)
    else:
        raise UserError(f"cannot read {path}: format {fmt!r} is not csv, tsv or jsonl (use --format)")
    with closing(rows):  # closes the file at once when reading stops early
        out = list(islice(rows, None if max_rows is None else max_rows + 1))
    if max_rows is not None and len(out) > max_rows:
        raise UserError(f"{path} has more than {max_rows:,} rows; the limit here is {max_rows:,}")
    if not out:
        raise UserError(f"{path} is empty" if path.stat().st_size == 0 else f"{path} has no data rows")
    return out


def _column_names(columns) -> list[str] | None:
    """--columns 'label,title,text' (or a list) -> the names of a headerless file's columns."""
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    return columns or None


def _column(rows: list[dict], column: str, where, role: str = "value") -> list[str]:
    """The stripped values of `column`: every row must have it, as text or a number (not null,
    not a JSON list or object, whose text would be meaningless). `role` names it in messages."""
    values = []
    for i, row in enumerate(rows):
        value = row.get(column)
        if value is None:
            if not any(column in other for other in rows):  # a wrong name, not one incomplete row
                raise UserError(f"column {quoted(column)} not in {getattr(row, 'path', where)}; "
                                f"it has: {_listing(row.keys())}")
            what = "has no" if column not in row else "has a null"
            raise UserError(f"{_place(row, i, where)} {what} value in column {quoted(column)}; "
                            "fill it in or drop the row")
        if not isinstance(value, (str, numbers.Number)):
            kind = ("a list" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, dict)
                    else f"a {type(value).__name__}")
            raise UserError(f"{_place(row, i, where)} has {kind} in column {quoted(column)}; "
                            f"the {role} must be text or a number")
        values.append(str(value).strip())
    return values


def _filled(rows: list[dict], column: str, where, role: str) -> list[str]:
    """`_column`, where an empty value (after stripping) is an error: an input or a response."""
    values = _column(rows, column, where, role)
    for i, value in enumerate(values):
        if not value:
            raise UserError(f"{_place(rows[i], i, where)} has an empty {role} (column {quoted(column)}); "
                            "fill it in or drop the row")
    return values


def _check_columns(text_column: str, other: str, role: str) -> None:
    """The input and the answer (label or response) must come from two different columns."""
    if text_column == other:
        raise UserError(f"the text and {role} columns are both {quoted(other)}; "
                        f"name the {role}s with --{role}-column and the inputs with --text-column")


def _label_column(rows: list[dict], column: str, where) -> list[str]:
    """The raw labels of `column`; a missing label ('', 'nan' or 'null', any case) is an error, not a
    class. 'none' is a label like any other: emotion and intent datasets have a 'none' class."""
    labels = _column(rows, column, where, "label")
    for i, label in enumerate(labels):
        if label.lower() in MISSING_LABELS:
            raise UserError(f"{_place(rows[i], i, where)} has no label ({quoted(label)} in column "
                            f"{quoted(column)}); give every row a label or drop the row")
    return labels


VERBALIZER_FORMAT = "write LABEL=WORD,LABEL=WORD (e.g. 0=negative,1=positive) or WORD,WORD"


def parse_verbalizers(spec: str | None) -> dict[str, str] | None:
    """'0=negative,1=positive' -> {'0': 'negative', '1': 'positive'}; 'neg,pos' -> identity map.

    Every part needs a label and a word; a label is mapped once, and no two labels share a
    word (the classifier could not tell them apart).
    """
    if not spec:
        return None
    out: dict[str, str] = {}
    for part in spec.split(","):
        raw, eq, word = (piece.strip() for piece in part.partition("="))
        word = (word if eq else raw).lower()
        if not raw or not word:
            raise UserError(f"--verbalizers part {quoted(part.strip())} needs a label and a word; {VERBALIZER_FORMAT}")
        if raw in out:
            raise UserError(f"--verbalizers maps label {quoted(raw)} twice; map each label once")
        same = next((label for label, w in out.items() if w == word), None)
        if same is not None:
            raise UserError(f"labels {quoted(same)} and {quoted(raw)} both map to {quoted(word)}; "
                            "verbalizer words must be distinct")
        out[raw] = word
    return out


def classification_examples(texts, raw_labels, instruction, verbalizers: dict | None, where,
                            rows: list[dict] | None = None) -> tuple[list[dict], list[str]]:
    """Turn (text, raw label) pairs into examples; unknown labels are an error, not skipped.

    `rows`, the rows the pairs came from, lets a message name the line of a bad label.
    """
    if verbalizers is None:  # derive: the label values themselves, lowercased, become the words
        verbalizers = {v: v.lower() for v in sorted(set(raw_labels))}
    examples = []
    for i, (text, raw) in enumerate(zip(texts, raw_labels)):
        if raw not in verbalizers:
            place = _place(rows[i], i, where) if rows else where
            raise UserError(f"label {quoted(raw)} in {place} is not among the verbalizers "
                            f"({_listing(verbalizers)}); pass --verbalizers to map it")
        examples.append({"instruction": instruction, "input": text, "response": verbalizers[raw]})
    labels = sorted(set(verbalizers.values()), key=list(verbalizers.values()).index)
    return examples, labels


def _check_two_labels(train: list[dict]) -> None:
    words = {ex["response"] for ex in train}
    if len(words) == 1:  # none at all is load_task's "no training examples"
        raise UserError(f"the train data has only one label ({quoted(words.pop())}); a classifier needs at least two")


def _check_eval_labels_seen(evals: list[dict], eval_rows: list[dict], raw_eval: list[str], train: list[dict]) -> None:
    """A label only the eval data has could never be learned (its word is never a training answer),
    whether the verbalizers are derived or given: its examples would only lower the score."""
    seen = {ex["response"] for ex in train}
    for i, ex in enumerate(evals):
        if ex["response"] not in seen:
            place = _place(eval_rows[i], i, "the eval data")
            raise UserError(f"the eval data has label {quoted(raw_eval[i])} ({place}) that the train data never has; "
                            "give the train data examples of every label")


# ---------------------------------------------------------------------------------------
# Built-in tasks
# ---------------------------------------------------------------------------------------

def _shown(path: Path) -> str:
    """A path as results files record it: relative, so no machine's layout leaks into them."""
    return os.path.relpath(path)


def data_folder(data_dir, what: str) -> Path:
    """`data_dir`, else the default folder of the real datasets; `what` names who needs it."""
    folder = data_dir or default_data_dir()
    if folder is None:
        raise UserError(f"{what} reads real data: point --data-dir (or LORA_DIFFUSION_DATA) at a folder "
                        "laid out as shared/data (sst2/, ag_news/, tinystories/, wikitext2/)")
    return Path(folder)


def _need(path: Path, task: str) -> Path:
    if not path.is_file():
        raise UserError(f"task {task} needs {path}; point --data-dir at a folder with it "
                        f"(the layout of shared/data: sst2/, ag_news/)")
    return path


def _sst2(data_dir: Path) -> Task:
    words = {"0": "negative", "1": "positive"}
    splits = {}
    for split, fname in (("train", "train.tsv"), ("eval", "dev.tsv")):
        path = _need(data_dir / "sst2" / fname, "sst2")
        rows = read_table(path)
        splits[split], labels = classification_examples(
            _column(rows, "sentence", path), _column(rows, "label", path), SENTIMENT_INSTRUCTION, words, path)
    return Task("sst2", "classification", splits["train"], splits["eval"], labels,
                source=f"SST-2 (GLUE) from {_shown(data_dir / 'sst2')}: train.tsv / dev.tsv")


def _agnews_test_rows(data_dir: Path) -> list[dict]:
    path = _need(data_dir / "ag_news" / "test.csv", "agnews")
    return read_table(path, columns=["label", "title", "description"], fmt="csv")


def _agnews(data_dir: Path) -> Task:
    path = _need(data_dir / "ag_news" / "train_subset_10k.tsv", "agnews")
    # Some descriptions contain tabs; the label is always the last field.
    rows = []
    with closing(_csv_records(path, "tsv")) as records:
        for _, row, _ in records:
            if len(row) >= 2 and row[-1].strip().lower() in AGNEWS_LABELS:
                rows.append({"description": " ".join(row[:-1]).strip(), "label": row[-1].strip().lower()})
    train, labels = classification_examples([r["description"] for r in rows], [r["label"] for r in rows],
                                            AGNEWS_TOPIC_INSTRUCTION, AGNEWS_LABELS, path)
    test = _agnews_test_rows(data_dir)
    # The test set is scored on descriptions only, as the train subset has no titles.
    evals, _ = classification_examples([r["description"] for r in test], [r["label"] for r in test],
                                       AGNEWS_TOPIC_INSTRUCTION, AGNEWS_LABELS, "ag_news/test.csv")
    return Task("agnews", "classification", train, evals, ["world", "sports", "business", "science"],
                source=f"AG News from {_shown(data_dir / 'ag_news')}: train_subset_10k.tsv / test.csv (descriptions)")


def _agnews_title(data_dir: Path) -> Task:
    path = _need(data_dir / "ag_news" / "train_head_2000.csv", "agnews_title")
    train_rows = read_table(path, columns=["label", "title", "description"], fmt="csv")
    make = lambda rows: [{"instruction": AGNEWS_TITLE_INSTRUCTION, "input": r["description"].strip(),
                          "response": r["title"].strip().lower()} for r in rows]
    return Task("agnews_title", "generation", make(train_rows), make(_agnews_test_rows(data_dir)),
                source=f"AG News titles from {_shown(data_dir / 'ag_news')}: train_head_2000.csv / test.csv")


def _suite(name: str) -> Task:
    folder = SUITE_DIR / name
    train = read_table(_need(folder / "train.jsonl", name))
    evals = read_table(_need(folder / "eval.jsonl", name))
    responses = sorted({ex["response"] for ex in train})
    is_classification = len(responses) <= 16
    return Task(name, "classification" if is_classification else "generation", train, evals,
                responses if is_classification else None, source=f"built-in suite (assets/suite/{name})")


BUILTIN = {"sst2": _sst2, "agnews": _agnews, "agnews_title": _agnews_title}
FILE_TASKS = ("csv", "tsv", "jsonl")
TASK_NAMES = tuple(BUILTIN) + SUITE_TASKS + FILE_TASKS


# A hub repository id, `name` or `owner/name`, and a config name: each part starts and ends with a
# letter, digit or '_' and has only letters, digits, '.', '_' and '-' (so no '/', '\\', '..' or ':').
HUB_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")


def _printable(text: str) -> str:
    text = cut(text)
    return text if text.isprintable() else repr(text)


def _hub_name(spec: str) -> tuple[str, str | None]:
    """(NAME, CONFIG) of `hub:NAME[:CONFIG]`, refused unless NAME is a hub dataset id.

    `datasets.load_dataset` also reads local paths (a folder, a file) and its own file readers
    ('csv', 'json', ... read the working directory): a task name from an adapter's config must
    never make it read this machine's files.
    """
    name, _, config = spec[4:].partition(":")
    hint = "for a local file use --task csv/tsv/jsonl --train-file"
    parts = name.split("/")
    local = os.path.lexists(name)  # load_dataset would read it from here, not from the hub
    if len(parts) > 2 or not all(HUB_PART.fullmatch(part) for part in parts) or ".." in name or local:
        raise UserError(f"hub:{_printable(name)} is not a Hugging Face dataset id (owner/name)"
                        f"{' but a local path' if local else ''}; {hint}")
    if config and (not HUB_PART.fullmatch(config) or ".." in config):
        raise UserError(f"hub:{name}:{_printable(config)}: the config must be a plain name "
                        "(letters, digits, '.', '_', '-')")
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if name.lower() in _PACKAGED_DATASETS_MODULES:  # load_dataset('csv') reads the working directory
        raise UserError(f"hub:{name} names a file reader of the datasets library, not a hub dataset; {hint}")
    return name, config or None


def _hub_task(spec: str, text_column: str, label_column: str | None, response_column: str | None,
              instruction: str | None, verbalizers) -> Task:
    """`hub:NAME[:CONFIG]`: a dataset from the Hugging Face hub (needs a network)."""
    name, config = _hub_name(spec)
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config)
    except Exception as err:  # offline, unknown name, ...
        reason = cut(" ".join(str(err).split()) or type(err).__name__, 200)
        raise UserError(f"could not load {name!r} from the hub ({reason}); "
                        "offline, use a local file with --task csv/tsv/jsonl") from None
    split_names = list(ds.keys())
    eval_split = next((s for s in ("validation", "test") if s in ds), None)
    if "train" not in ds or eval_split is None:
        raise UserError(f"{name} needs a train split and a validation or test split; it has {split_names}")
    return _rows_task(f"hub:{name}", [dict(r) for r in ds["train"]], [dict(r) for r in ds[eval_split]],
                      text_column, label_column, response_column, instruction, verbalizers,
                      source=f"hub dataset {name} ({config or 'default'}): train / {eval_split}")


GENERATION_INSTRUCTION = "respond to this text ."


def _generation_examples(rows: list[dict], text_column: str, response_column: str, instruction: str,
                         where) -> list[dict]:
    return [{"instruction": instruction, "input": t, "response": r.lower()}
            for t, r in zip(_filled(rows, text_column, where, "input"),
                            _filled(rows, response_column, where, "response"))]


def _rows_task(name, train_rows, eval_rows, text_column, label_column, response_column,
               instruction, verbalizers, source) -> Task:
    if response_column:  # generation
        instruction = instruction or GENERATION_INSTRUCTION
        return Task(name, "generation",
                    _generation_examples(train_rows, text_column, response_column, instruction, "the train data"),
                    _generation_examples(eval_rows, text_column, response_column, instruction, "the eval data"),
                    source=source)
    label_column = label_column or "label"
    raw_train = _label_column(train_rows, label_column, "the train data")
    raw_eval = _label_column(eval_rows, label_column, "the eval data")
    verbalizers = verbalizers or {v: v.lower() for v in sorted(set(raw_train) | set(raw_eval))}
    labels_text = " , ".join(sorted(set(verbalizers.values())))
    instruction = instruction or f"classify this text . answer {labels_text} ."
    train, labels = classification_examples(_filled(train_rows, text_column, "the train data", "input"), raw_train,
                                            instruction, verbalizers, "the train data", train_rows)
    evals, _ = classification_examples(_filled(eval_rows, text_column, "the eval data", "input"), raw_eval,
                                       instruction, verbalizers, "the eval data", eval_rows)
    _check_two_labels(train)
    _check_eval_labels_seen(evals, eval_rows, raw_eval, train)
    return Task(name, "classification", train, evals, labels, source=source)


def load_task(name: str, data_dir=None, train_file=None, eval_file=None, fmt: str | None = None,
              text_column: str = "text", label_column: str | None = None, response_column: str | None = None,
              columns: str | None = None, instruction: str | None = None, verbalizers: str | None = None,
              max_train: int | None = None, max_eval: int | None = None, eval_fraction: float = 0.1,
              seed: int = 0, max_rows: int | None = None, max_heldout: int | None = None) -> Task:
    """Load a task by name (see TASK_NAMES), from files, or from the hub (`hub:NAME`).

    `max_train` keeps a random, label-stratified subset drawn with `seed` (each training
    seed may see other examples). The held-out side never depends on `seed`: a file task
    without `eval_file` holds out `eval_fraction` of the train file (at most `max_heldout`
    rows; the rest stay for training) and `max_eval` keeps a subset, both drawn with
    SPLIT_SEED, so every seed and method is scored on the same examples and an adapter is
    never evaluated on what it was trained on. A file with more than `max_rows` rows is an error.
    """
    verbal = parse_verbalizers(verbalizers)
    if name in FILE_TASKS or name.startswith("hub:"):  # before reading anything
        if response_column:
            _check_columns(text_column, response_column, "response")
        else:
            _check_columns(text_column, label_column or "label", "label")
    if name in BUILTIN:
        task = BUILTIN[name](data_folder(data_dir, f"task {name}"))
    elif name in SUITE_TASKS:
        task = _suite(name)
    elif name in FILE_TASKS:
        if not train_file:
            raise UserError(f"--task {name} needs --train-file (and optionally --eval-file)")
        names = _column_names(columns)
        train_rows = read_table(train_file, names, fmt or name, max_rows)
        if eval_file:
            eval_rows = read_table(eval_file, names, fmt or name, max_rows)
        else:  # hold out a seeded slice of the train file
            shuffled = train_rows[:]
            random.Random(SPLIT_SEED).shuffle(shuffled)
            cut = max(1, int(len(shuffled) * eval_fraction))
            if max_heldout is not None:
                cut = min(cut, max_heldout)
            eval_rows, train_rows = shuffled[:cut], shuffled[cut:]
        if not eval_rows or not train_rows:
            raise UserError(f"{eval_file or train_file} leaves no examples to train or evaluate on")
        task = _rows_task(Path(train_file).stem, train_rows, eval_rows, text_column, label_column,
                          response_column, instruction, verbal,
                          source=f"{train_file}" + (f" / {eval_file}" if eval_file else f" ({eval_fraction:.0%} held out)"))
    elif name.startswith("hub:"):
        task = _hub_task(name, text_column, label_column, response_column, instruction, verbal)
    else:
        raise UserError(f"unknown task {name!r}; choose from: {', '.join(TASK_NAMES)} or hub:NAME")
    if not task.train or not task.eval:
        raise UserError(f"task {task.name} has no {'training' if not task.train else 'evaluation'} examples")
    task.info["full_train"], task.info["full_eval"] = len(task.train), len(task.eval)
    task.train = subsample(task.train, max_train, seed)
    task.eval = subsample(task.eval, max_eval, SPLIT_SEED)
    return task


def load_eval_task(fmt: str | None, eval_file, adapter_task: dict, text_column: str = "text",
                   label_column: str | None = None, response_column: str | None = None, columns=None,
                   verbalizers: str | None = None, max_eval: int | None = None, max_rows: int | None = None) -> Task:
    """An eval-only Task from one file, posed as the adapter's task (its saved config "task").

    No train file is needed: the adapter carries its kind, instruction and label words. Raw
    labels are mapped with `verbalizers`, else lowercased, and must be words the adapter
    knows; a generation adapter needs the file's `response_column` (the reference answers).
    """
    if not adapter_task:
        raise UserError("evaluating a file without --train-file needs --adapter (its task says what to answer)")
    if not eval_file:
        raise UserError("evaluating an adapter on a file needs --eval-file")
    kind, known = adapter_task.get("kind"), adapter_task.get("labels") or []
    instruction = adapter_task.get("instruction")
    if not instruction or kind not in ("classification", "generation") or (kind == "classification" and not known):
        raise UserError(f"the adapter's saved task has no {'instruction' if not instruction else 'kind or labels'}; "
                        "evaluate it with its --train-file instead")
    if kind == "generation" and response_column:
        _check_columns(text_column, response_column, "response")
    elif kind == "classification":
        _check_columns(text_column, label_column or "label", "label")
    rows = read_table(eval_file, _column_names(columns), fmt, max_rows)
    if kind == "generation":
        if not response_column:
            raise UserError(f"the adapter writes text (a generation task): pass --response-column naming the column "
                            f"of {eval_file} with the reference answers")
        examples = _generation_examples(rows, text_column, response_column, instruction, eval_file)
    else:
        if response_column:
            raise UserError(f"the adapter is a classifier ({_listing(known)}): name the labels with --label-column, "
                            "not --response-column")
        raw = _label_column(rows, label_column or "label", eval_file)
        words = parse_verbalizers(verbalizers) or {label: label.lower() for label in set(raw)}
        texts = _filled(rows, text_column, eval_file, "input")
        examples, _ = classification_examples(texts, raw, instruction, words, eval_file, rows)
        for i, ex in enumerate(examples):
            if ex["response"] not in known:
                raise UserError(f"label {quoted(raw[i])} in {_place(rows[i], i, eval_file)} is not one the adapter "
                                f"knows ({_listing(known)}); pass --verbalizers to map it")
    task = Task(Path(eval_file).stem, kind, [], examples, list(known) if kind == "classification" else None,
                source=f"{eval_file}, posed as the adapter's task {adapter_task.get('name')}")
    task.info["full_train"], task.info["full_eval"] = 0, len(examples)
    task.eval = subsample(examples, max_eval, SPLIT_SEED)
    return task


def check_task_fits_adapter(task: Task, adapter_task: dict, adapter_name: str) -> None:
    """An adapter can only be scored on a task of its kind whose labels it was trained to answer."""
    kind = adapter_task.get("kind")
    if kind != task.kind:
        raise UserError(f"adapter {adapter_name} was trained for {kind} and task {task.name} is {task.kind}; "
                        f"evaluate it on a {kind} task")
    if kind == "classification":
        known = adapter_task.get("labels") or []
        needed = list(dict.fromkeys((task.labels or []) + [ex["response"] for ex in task.eval]))
        if any(word not in known for word in needed):
            raise UserError(f"adapter {adapter_name} answers {_listing(known)}; "
                            f"task {task.name} needs {_listing(needed)}")


def subsample(examples: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded random subset of n examples, stratified by response (keeps label balance)."""
    if n is None or n >= len(examples):
        return examples
    rng = random.Random(seed)
    by_response: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_response.setdefault(ex["response"], []).append(i)
    if len(by_response) > 16:  # generation: plain random subset
        keep = rng.sample(range(len(examples)), n)
    else:
        keep = []
        for idx in by_response.values():
            keep += rng.sample(idx, round(n * len(idx) / len(examples)))
        chosen = set(keep)  # built once: a set per element is quadratic on large files
        rest = [i for i in range(len(examples)) if i not in chosen]
        keep += rng.sample(rest, max(0, n - len(keep)))
        keep = keep[:n]
    return [examples[i] for i in sorted(keep)]


# ---------------------------------------------------------------------------------------
# Encoding and batching
# ---------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """A task's examples as token ids, ready to batch."""

    prompts: list[list[int]]       # [CLS] instruction [SEP] input [SEP]
    responses: list[list[int]]     # answer + [SEP] filler, all of length response_length
    instructions: list[list[int]]  # instruction tokens alone (the conditioning c)
    response_length: int
    n_truncated: int = 0


def response_length_for(tokenizer, examples: list[dict], cap: int = 32) -> int:
    """Fixed response length of a task: the longest answer + 1 end marker, at most `cap`."""
    longest = max(len(tokenizer(ex["response"], add_special_tokens=False)["input_ids"]) for ex in examples)
    return min(longest + 1, cap)


PROMPT_SPECIAL_TOKENS = 3  # [CLS], [SEP], [SEP]


def prompt_ids(tokenizer, instruction: list[int], text: list[int]) -> list[int]:
    """The prompt layout: [CLS] instruction [SEP] input [SEP] (PROMPT_SPECIAL_TOKENS of them)."""
    return [tokenizer.cls_token_id] + instruction + [tokenizer.sep_token_id] + text + [tokenizer.sep_token_id]


def response_ids(answer: list[int], sep_id: int, length: int) -> list[int]:
    """A response of fixed `length`: the answer, then [SEP] filler (cut at `length`)."""
    return (answer + [sep_id] * length)[:length]


def answer_ids(ids: list[int], sep_id: int) -> list[int]:
    """The answer part of a response: everything before the first [SEP]."""
    return ids[: ids.index(sep_id)] if sep_id in ids else ids


def encode(tokenizer, examples: list[dict], response_length: int, max_length: int,
           truncate: bool = False, where: str = "data") -> Encoded:
    """Tokenise examples into the sequence layout; inputs that do not fit are an error unless `truncate`."""
    sep = tokenizer.sep_token_id
    ins = tokenizer([ex["instruction"] for ex in examples], add_special_tokens=False)["input_ids"]
    inp = tokenizer([ex["input"] for ex in examples], add_special_tokens=False)["input_ids"]
    out = tokenizer([ex["response"] for ex in examples], add_special_tokens=False)["input_ids"]
    prompts, responses, n_truncated = [], [], 0
    for i, (a, b, r) in enumerate(zip(ins, inp, out)):
        room = max_length - response_length - len(a) - PROMPT_SPECIAL_TOKENS
        if room < 1:
            raise UserError(f"example {i} of {where}: the instruction and response alone need "
                            f"{len(a) + PROMPT_SPECIAL_TOKENS + response_length} positions, the model has {max_length}")
        if len(b) > room:
            if not truncate:
                raise UserError(f"example {i} of {where} is "
                                f"{len(a) + len(b) + PROMPT_SPECIAL_TOKENS + response_length} tokens, "
                                f"longer than the model's {max_length} positions; pass --truncate to cut "
                                "long inputs")
            b, n_truncated = b[:room], n_truncated + 1
        prompts.append(prompt_ids(tokenizer, a, b))
        responses.append(response_ids(r, sep, response_length))
    return Encoded(prompts, responses, ins, response_length, n_truncated)


def encode_prompt(tokenizer, instruction: str, text: str | None, response_length: int, max_length: int,
                  n: int = 1, truncate: bool = False) -> Encoded:
    """`n` copies of one free-form prompt with an all-[MASK] response, for the sampler.

    With neither an instruction nor an input the prompt is [CLS] alone (unconditional text).
    An input too long for the model is an error, or cut to fit with `truncate`.
    """
    ins = tokenizer(instruction or "", add_special_tokens=False)["input_ids"]
    if text is None and not ins:
        prompt = [tokenizer.cls_token_id]
    else:
        body = tokenizer(text or "", add_special_tokens=False)["input_ids"]
        if truncate:
            body = body[:max(0, max_length - response_length - len(ins) - PROMPT_SPECIAL_TOKENS)]
        prompt = prompt_ids(tokenizer, ins, body)
    if len(prompt) + response_length > max_length:
        raise UserError(f"prompt + {response_length} response tokens = {len(prompt) + response_length} tokens, "
                        f"longer than the model's {max_length} positions")
    return Encoded([prompt] * n, [[tokenizer.mask_token_id] * response_length] * n, [ins] * n, response_length)


def collate(enc: Encoded, indices, pad_id: int, mask_response: int | None = None) -> dict:
    """Right-padded batch of the chosen examples: input_ids, attention_mask, response_mask, instruction."""
    seqs = [enc.prompts[i] + enc.responses[i] for i in indices]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    response = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (i, seq) in enumerate(zip(indices, seqs)):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        attention[row, :len(seq)] = 1
        response[row, len(enc.prompts[i]):len(seq)] = True
    if mask_response is not None:
        input_ids = input_ids.masked_fill(response, mask_response)
    ins = [enc.instructions[i] for i in indices]
    instruction = torch.full((len(ins), max(1, max(map(len, ins)))), pad_id, dtype=torch.long)
    for row, ids in enumerate(ins):
        instruction[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response,
            "instruction": instruction}


def batch_schedule(n_examples: int, batch_size: int, seed: int):
    """`batch_for_step(step)` -> example indices: seeded reshuffle every epoch, resumable at any step."""
    def indices(step: int) -> list[int]:
        first = step * batch_size
        out = []
        for pos in range(first, first + batch_size):
            epoch, offset = divmod(pos, n_examples)
            perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
            out.append(int(perm[offset]))
        return out
    return indices


# ---------------------------------------------------------------------------------------
# Plain text (for the base and for forgetting)
# ---------------------------------------------------------------------------------------

def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def text_corpus(data_dir: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train texts, held-out texts) of generic text, each a dict source -> list of lines.

    What `prepare-base` trains the base on and holds out (the forgetting analysis scores
    the held-out part): TinyStories and WikiText-2 samples, and the sentences of SST-2 and
    AG News train without their labels.
    """
    data_dir = data_folder(data_dir, "generic text (the base's training and held-out text)")
    if not data_dir.is_dir():
        raise UserError(f"data folder not found: {data_dir}")
    train, heldout = {}, {}
    ts = data_dir / "tinystories"
    if (ts / "TinyStories-train_head_sample.txt").is_file():
        train["tinystories_train"] = _read_lines(ts / "TinyStories-train_head_sample.txt")
    if (ts / "TinyStories-valid_head_sample.txt").is_file():
        valid = _read_lines(ts / "TinyStories-valid_head_sample.txt")
        cut = int(len(valid) * 0.8)
        train["tinystories_valid_head80"] = valid[:cut]
        heldout["tinystories_valid_tail20"] = valid[cut:]
    wt = data_dir / "wikitext2"
    if (wt / "valid.txt").is_file():
        train["wikitext2_valid"] = _read_lines(wt / "valid.txt")
    if (wt / "test.txt").is_file():
        heldout["wikitext2_test"] = _read_lines(wt / "test.txt")
    sst = data_dir / "sst2" / "train.tsv"
    if sst.is_file():  # sentences only: the labels are never seen here
        with open(sst, newline="", encoding="utf-8") as f:
            train["sst2_train_sentences"] = [row["sentence"].strip() for row in csv.DictReader(f, delimiter="\t")]
    ag = data_dir / "ag_news"
    if (ag / "train_subset_10k.tsv").is_file():
        with open(ag / "train_subset_10k.tsv", newline="", encoding="utf-8") as f:
            train["agnews_train_descriptions"] = [row[0].strip() for row in csv.reader(f, delimiter="\t") if row]
    if (ag / "train_head_2000.csv").is_file():
        with open(ag / "train_head_2000.csv", newline="", encoding="utf-8") as f:
            train["agnews_train_head_titles_descriptions"] = [
                f"{row[1].strip()}. {row[2].strip()}" for row in csv.reader(f) if len(row) >= 3]
    if not train or not heldout:
        raise UserError(f"{data_dir} has none of the expected text files (tinystories/, wikitext2/, sst2/, ag_news/)")
    return train, heldout


# ---------------------------------------------------------------------------------------
# Packing plain text: packed rows, every token a response token
# ---------------------------------------------------------------------------------------

def pack_text(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenise lines, join them with [SEP], cut the stream into [CLS] + (seq_len - 1) token rows."""
    ids: list[int] = []
    for start in range(0, len(texts), 2000):
        for row in tokenizer(texts[start:start + 2000], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(tokenizer.sep_token_id)
    body = seq_len - 1
    n_rows = len(ids) // body
    if n_rows == 0:
        raise UserError(f"the text is shorter than one row of {seq_len} tokens")
    rows = torch.tensor(ids[: n_rows * body], dtype=torch.long).view(n_rows, body)
    cls = torch.full((n_rows, 1), tokenizer.cls_token_id, dtype=torch.long)
    return torch.cat([cls, rows], 1)


def text_batch(rows: torch.Tensor, prefix_len: torch.Tensor | None = None) -> dict:
    """A plain-text batch: every token but [CLS] (and an optional clean prefix) is a response token."""
    positions = torch.arange(rows.shape[1])[None, :].expand(rows.shape[0], -1)
    response = positions >= 1
    if prefix_len is not None:
        response = response & (positions >= (1 + prefix_len[:, None]))
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows), "response_mask": response}


def text_batches(rows: torch.Tensor, batch_size: int = 32) -> list[dict]:
    return [text_batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
