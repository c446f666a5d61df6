"""The bad-input corpus of the command line: each case ends with exit code 2, one readable line that
says what to fix, no traceback, and nothing half-written.

Each case is (id, argv, what the last line of stderr must contain). `{name}` in an argument is one
of the files the `files` fixture writes: broken data files, broken adapters, broken bases. The
app's API has its own corpus in test_app_boundary.py.
"""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_lines
from lora_diffusion.adapters import CONFIG_FILE, TENSORS_FILE
from lora_diffusion.cli import main

RUN = ["--base", "{base}", "--steps", "2", "--batch-size", "4", "--sampler-steps", "2",
       "--max-eval-examples", "4", "--out", "{out}"]
TRAIN = ["train", "--task", "suite_sentiment", "--method", "lora"] + RUN
CSV = ["train", "--task", "csv", "--method", "lora"] + RUN + ["--train-file"]
EVAL = ["eval", "--base", "{base}", "--steps", "2", "--max-eval-examples", "4", "--adapter"]
SAMPLE = ["sample", "--base", "{base}", "--steps", "2"]
COMPARE = ["compare", "--base", "{base}", "--task", "suite_sentiment", "--methods", "lora", "--steps", "1",
           "--seed", "0", "--out", "{out}"]

CASES = [
    # numbers out of range or not numbers, refused when the command line is parsed
    ("lr negative", TRAIN + ["--lr", "-1"], r"--lr: wants a finite number > 0"),
    ("lr nan", TRAIN + ["--lr", "nan"], r"--lr: wants a finite number > 0"),
    ("lr inf", TRAIN + ["--lr", "inf"], r"--lr: wants a finite number > 0"),
    ("lr zero", TRAIN + ["--lr", "0"], r"--lr: wants a finite number > 0"),
    ("lr text", TRAIN + ["--lr", "fast"], r"--lr: wants a finite number"),
    ("lr overflowing float32", TRAIN + ["--lr", "1e39"], r"--lr: wants a finite number > 0 and <= 10"),
    ("warmup nan", TRAIN + ["--warmup", "nan"], r"--warmup: wants a finite number >= 0 and <= 1"),
    ("warmup above one", TRAIN + ["--warmup", "2"], r"--warmup: wants"),
    ("steps zero", TRAIN + ["--steps", "0"], r"--steps: wants a whole number >= 1"),
    ("steps fraction", TRAIN + ["--steps", "2.5"], r"--steps: wants a whole number"),
    ("batch size zero", TRAIN + ["--batch-size", "0"], r"--batch-size: wants a whole number >= 1"),
    ("grad accum zero", TRAIN + ["--grad-accum", "0"], r"--grad-accum: wants"),
    ("clip negative", TRAIN + ["--clip", "-1"], r"--clip: wants a finite number >= 0"),
    ("weight decay nan", TRAIN + ["--weight-decay", "nan"], r"--weight-decay: wants"),
    ("epochs zero", ["train", "--task", "suite_sentiment", "--epochs", "0", "--out", "{out}"], r"--epochs: wants"),
    ("epochs huge", ["train", "--task", "suite_sentiment", "--epochs", "1e308", "--out", "{out}"], r"--epochs: wants"),
    ("epochs and steps", TRAIN + ["--epochs", "1"], r"give --steps or --epochs, not both"),
    ("eval every negative", TRAIN + ["--eval-every", "-1"], r"--eval-every: wants a whole number >= 0"),
    ("checkpoint every negative", TRAIN + ["--checkpoint-every", "-5"], r"--checkpoint-every: wants"),
    ("sampler steps zero", TRAIN + ["--sampler-steps", "0"], r"--sampler-steps: wants"),
    ("max length zero", TRAIN + ["--max-length", "0"], r"--max-length: wants"),
    ("max length too long", TRAIN + ["--max-length", "100000"], r"longer than the model's"),
    ("max train zero", TRAIN + ["--max-train-examples", "0"], r"--max-train-examples: wants"),
    ("threads zero", TRAIN + ["--threads", "0"], r"--threads: wants"),
    ("seed negative", TRAIN + ["--seed", "-3"], r"--seed: wants a whole number >= 0"),
    ("seed twice", TRAIN + ["--seed", "1", "1"], r"lists a seed twice"),
    ("device missing", TRAIN + ["--device", "cuda:7"], r"cuda"),
    ("device unknown", TRAIN + ["--device", "gpu"], r"gpu"),
    # method options, checked by the method's config
    ("option not a number", TRAIN + ["--option", "r=abc"], r"option 'r' must be an integer"),
    ("option fractional rank", TRAIN + ["--option", "r=1.5"], r"option 'r' must be an integer"),
    ("option rank zero", TRAIN + ["--option", "r=0"], r"option 'r' must be"),
    ("option huge rank", TRAIN + ["--option", "r=400000"], r"option 'r' must be an integer in \[1, 1024\]"),
    ("option huge hypernetwork", ["train", "--task", "suite_sentiment", "--method", "nara", "--option", "r=1024",
                                  "--out", "{out}"], r"hidden \* r\^2 must be at most"),
    ("eval adapter with a huge rank", EVAL + ["{huge_rank}"], r"option 'r' must be an integer in \[1, 1024\]"),
    ("option unknown", TRAIN + ["--option", "rank=4"], r"has no option 'rank'"),
    ("option without value", TRAIN + ["--option", "r"], r"--option wants KEY=VALUE"),
    ("option nan", ["train", "--task", "suite_sentiment", "--method", "lora_diffusion", "--option",
                    "lambda_rank=nan", "--out", "{out}"], r"option 'lambda_rank' must be a finite number"),
    ("option wrong length", ["train", "--task", "suite_sentiment", "--method", "lora_diffusion", "--option",
                             "ranks=64,32", "--out", "{out}"], r"option 'ranks' must be none, or 3 comma-separated"),
    ("method unknown", ["train", "--task", "suite_sentiment", "--method", "magic", "--out", "{out}"],
     r"unknown method 'magic'"),
    # data files
    ("task unknown", ["train", "--task", "imdb", "--out", "{out}"], r"unknown task 'imdb'"),
    ("csv without file", ["train", "--task", "csv", "--out", "{out}"], r"needs --train-file"),
    ("csv missing", CSV + ["{nowhere}/x.csv"], r"data file not found"),
    ("csv latin-1", CSV + ["{latin1}"], r"not UTF-8"),
    ("csv binary", CSV + ["{binary}"], r"not UTF-8|binary"),
    ("csv huge field", CSV + ["{huge_field}"], r"line \d+"),
    ("csv ragged row", CSV + ["{ragged}"], r"line 3"),
    ("csv header only", CSV + ["{header_only}"], r"no data rows"),
    ("csv empty", CSV + ["{empty}"], r"no data rows|empty"),
    ("csv one label", CSV + ["{one_label}"], r"only one label"),
    ("csv empty label", CSV + ["{empty_label}"], r"label"),
    ("csv nan label", CSV + ["{nan_label}"], r"'nan'"),
    ("csv column missing", CSV + ["{reviews}", "--text-column", "body"], r"column 'body'"),
    ("csv label column missing", CSV + ["{reviews}", "--label-column", "stars"], r"column 'stars'"),
    ("verbalizers not distinct", CSV + ["{reviews}", "--verbalizers", "0=good,1=good"], r"distinct"),
    ("verbalizers miss a label", CSV + ["{reviews}", "--verbalizers", "0=bad"], r"label '1'"),
    ("eval label unseen", CSV + ["{reviews}", "--eval-file", "{unseen_label}"], r"'maybe'"),
    ("jsonl invalid line", ["train", "--task", "jsonl", "--out", "{out}", "--train-file", "{bad_jsonl}"],
     r"line 2"),
    ("jsonl missing key", ["train", "--task", "jsonl", "--out", "{out}", "--train-file", "{jsonl_missing_key}"],
     r"'label'"),
    ("jsonl not an object", ["train", "--task", "jsonl", "--out", "{out}", "--train-file", "{jsonl_list}"],
     r"line 2"),
    # bases
    ("base missing", TRAIN[:-2] + ["--out", "{out}", "--base", "{nowhere}"], r"base model folder not found"),
    ("base not a model", TRAIN[:-2] + ["--out", "{out}", "--base", "{not_a_model}"], r"not a model folder"),
    ("base corrupt weights", TRAIN[:-2] + ["--out", "{out}", "--base", "{corrupt_base}"],
     r"could not load a masked LM"),
    ("base pickle only", TRAIN[:-2] + ["--out", "{out}", "--base", "{pickle_base}"], r"could not load a masked LM"),
    # outputs
    ("out is a file", TRAIN[:-2] + ["--out", "{a_file}"], r"exists and is not a folder"),
    ("out under a file", TRAIN[:-2] + ["--out", "{a_file}/run"], r"is a file, not a folder"),
    ("results under a file", TRAIN + ["--results", "{a_file}/r.json"], r"--results: cannot write"),
    ("results is a folder", TRAIN + ["--results", "{nothing_dir}"], r"exists and is not a file"),
    # eval
    ("eval batch size zero", EVAL + ["{adapter}", "--batch-size", "0"], r"--batch-size: wants"),
    ("eval steps zero", EVAL + ["{adapter}", "--steps", "0"], r"--steps: wants"),
    ("eval nothing", ["eval"], r"give --task"),
    ("eval adapter missing", EVAL + ["{nowhere}"], r"not found"),
    ("eval adapter config missing field", EVAL + ["{no_method}"], r"'method'"),
    ("eval adapter config only format", EVAL + ["{only_format}"], r"not a valid lora-diffusion adapter"),
    ("eval adapter bad option", EVAL + ["{bad_option}"], r"option 'r'"),
    ("eval adapter newer version", EVAL + ["{new_version}"], r"version"),
    ("eval adapter nan weights", EVAL + ["{nan_weights}"], r"NaN"),
    ("eval adapter truncated tensors", EVAL + ["{truncated}"], r"not a readable safetensors"),
    ("eval adapter wrong tensors", EVAL + ["{wrong_tensors}"], r"do not belong together|does not fit"),
    ("eval adapter misshapen", EVAL + ["{misshapen}"], r"shape"),
    ("eval adapter not json", EVAL + ["{not_json}"], r"not valid JSON"),
    ("eval sentiment adapter on topics", EVAL + ["{adapter}", "--task", "suite_topic"], r"answers"),
    ("eval adapter on a generation task", EVAL + ["{adapter}", "--task", "suite_struct"], r"generation|answers"),
    ("eval file adapter without a task", EVAL + ["{csv_adapter}"], r"give --task csv/tsv/jsonl with --eval-file"),
    ("eval file adapter on a file of other labels", EVAL + ["{csv_adapter}", "--task", "csv", "--eval-file",
                                                            "{unseen_label}"], r"'maybe'"),
    ("eval out under a file", EVAL + ["{adapter}", "--out", "{a_file}/e.json"], r"--out: cannot write"),
    # sample
    ("sample n zero", SAMPLE + ["--n", "0"], r"--n: wants"),
    ("sample length zero", SAMPLE + ["--length", "0"], r"--length: wants"),
    ("sample steps zero", SAMPLE + ["--steps", "0"], r"--steps: wants"),
    ("sample temperature nan", SAMPLE + ["--temperature", "nan"], r"--temperature: wants"),
    ("sample temperature huge", SAMPLE + ["--temperature", "1e308"], r"--temperature: wants"),
    ("sample block length zero", SAMPLE + ["--block-length", "0"], r"--block-length: wants"),
    ("sample broken adapter", SAMPLE + ["--adapter", "{only_format}"], r"not a valid lora-diffusion adapter"),
    # compare, profile, analyses, report, app
    ("compare lr sweep text", COMPARE + ["--lr-sweep", "a,b"], r"--lr-sweep: wants a finite number"),
    ("compare lr sweep zero", COMPARE + ["--lr-sweep", "0,1"], r"--lr-sweep: wants"),
    ("compare method unknown", COMPARE[:-6] + ["--methods", "magic", "--seed", "0", "--out", "{out}"],
     r"unknown method"),
    ("compare jobs zero", COMPARE + ["--jobs", "0"], r"--jobs: wants"),
    ("compare validation fraction", COMPARE + ["--validation-fraction", "1.5"], r"--validation-fraction"),
    ("compare lr-from not results", COMPARE + ["--lr-from", "{a_json_list}"], r"not the results.json of"),
    ("compare lr sweep huge", COMPARE + ["--lr-sweep", "1e308"], r"--lr-sweep: wants"),
    ("compare lr-from missing", COMPARE + ["--lr-from", "{nowhere}/r.json"], r"not found"),
    ("profile method unknown", ["profile", "--methods", "magic"], r"unknown method"),
    ("profile batch zero", ["profile", "--batch-size", "0"], r"--batch-size: wants"),
    ("scaling ranks text", ["analyze", "scaling", "--ranks", "a", "--out", "{out}"], r"--ranks: wants"),
    ("data-efficiency sizes zero", ["analyze", "data-efficiency", "--task", "suite_sentiment", "--sizes", "0,10",
                                    "--out", "{out}"], r"--sizes: wants"),
    ("effective rank adapter missing", ["analyze", "effective-rank", "--base", "{base}", "--adapters",
                                        "{nowhere}", "--out", "{out}"], r"not found"),
    ("tsne examples zero", ["analyze", "tsne", "--adapters", "{adapter}", "--examples", "0", "--out", "{out}"],
     r"--examples: wants"),
    ("report missing", ["report", "{nowhere}/r.json"], r"not found"),
    ("report not json", ["report", "{not_json_file}"], r"not valid JSON"),
    ("report not results", ["report", "{a_json_list}"], r"not a results file"),
    ("resume with another task", TRAIN[:-2] + ["--out", "{good_run}", "--task", "suite_topic"],
     r"holds a run with task=.*resume it with the same settings, or give a new --out"),
    ("resume with other options", TRAIN[:-2] + ["--out", "{good_run}", "--option", "r=4"],
     r"holds a run with options="),
    ("app port", ["app", "--port", "70000"], r"--port: wants"),
    ("app job minutes nan", ["app", "--job-minutes", "nan"], r"--job-minutes: wants"),
    ("app workspace is a file", ["app", "--workspace", "{a_file}"], r"exists and is not a folder"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_base_dir):
    """Every broken input the cases name, and one good adapter trained on the tiny base."""
    root = tmp_path_factory.mktemp("bad")
    f = {"base": tiny_base_dir, "nowhere": root / "nowhere", "a_file": write_lines(root / "a_file.txt", ["x"])}
    reviews = ["text,label"] + [f"review {i} {'great' if i % 2 else 'awful'},{i % 2}" for i in range(30)]
    f["reviews"] = write_lines(root / "reviews.csv", reviews)
    f["latin1"] = root / "latin1.csv"
    f["latin1"].write_bytes("text,label\ncaf\u00e9 tr\u00e8s bon,1\nmauvais,0\n".encode("latin-1"))
    f["binary"] = root / "binary.csv"
    f["binary"].write_bytes(bytes(range(256)) * 8)
    f["huge_field"] = write_lines(root / "huge.csv", ["text,label", "a" * 1_100_000 + ",1", "b,0"])
    f["ragged"] = write_lines(root / "ragged.csv", ["text,label", "good,1", "bad,0,extra"] + reviews[1:])
    f["header_only"] = write_lines(root / "header.csv", ["text,label"])
    f["empty"] = root / "empty.csv"
    f["empty"].write_text("")
    f["one_label"] = write_lines(root / "one.csv", ["text,label"] + [f"review {i},1" for i in range(20)])
    f["empty_label"] = write_lines(root / "empty_label.csv", reviews + ["no label here,"])
    f["nan_label"] = write_lines(root / "nan_label.csv", reviews + ["a review,nan"])
    f["unseen_label"] = write_lines(root / "unseen.csv", ["text,label", "good,1", "hmm,maybe"])
    f["bad_jsonl"] = write_lines(root / "bad.jsonl", ['{"text": "a", "label": "x"}', '{"text": "b", '])
    f["jsonl_missing_key"] = write_lines(root / "missing.jsonl", [json.dumps({"text": f"t{i}", "label": str(i % 2)})
                                                                  for i in range(20)] + ['{"text": "no label"}'])
    f["jsonl_list"] = write_lines(root / "list.jsonl", ['{"text": "a", "label": "x"}', "[1, 2]"])
    f["not_json_file"] = write_lines(root / "not.json", ["{ nope"])
    f["a_json_list"] = write_lines(root / "list.json", ["[1, 2, 3]"])
    f["nothing_dir"] = root / "a_folder"
    f["nothing_dir"].mkdir()
    f["not_a_model"] = root / "not_a_model"
    f["not_a_model"].mkdir()
    f["corrupt_base"] = _copy(tiny_base_dir, root / "corrupt_base")
    weights = f["corrupt_base"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    f["pickle_base"] = _copy(tiny_base_dir, root / "pickle_base")
    (f["pickle_base"] / "model.safetensors").rename(f["pickle_base"] / "pytorch_model.bin")
    f["adapter"] = _train_adapter(root / "good", tiny_base_dir)
    f["good_run"] = f["adapter"].parent
    f["csv_adapter"] = _train_adapter(root / "good_csv", tiny_base_dir, "--task", "csv", "--train-file", f["reviews"])
    f.update(_broken_adapters(f["adapter"], root))
    return f


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _train_adapter(out, base, *task) -> object:
    task = task or ("--task", "suite_sentiment")
    code = main(["train", "--base", str(base), *map(str, task), "--method", "lora", "--steps", "2",
                 "--batch-size", "4", "--max-eval-examples", "4", "--sampler-steps", "2", "--out", str(out)])
    assert code == 0
    return out / "adapter"


def _broken_adapters(good, root) -> dict:
    """Copies of a good adapter, each broken in one way."""
    config = json.loads((good / CONFIG_FILE).read_text())
    tensors = {k: v for k, v in _load(good).items()}

    def variant(name, config=config, tensors=tensors, raw_config=None):
        folder = root / name
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(raw_config if raw_config is not None else json.dumps(config))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / TENSORS_FILE))
        return folder

    first = next(iter(tensors))
    out = {
        "no_method": variant("no_method", {k: v for k, v in config.items() if k != "method"}),
        "only_format": variant("only_format", {"format": config["format"]}),
        "bad_option": variant("bad_option", {**config, "options": {**config["options"], "r": "many"}}),
        "huge_rank": variant("huge_rank", {**config, "options": {**config["options"], "r": 400000}}),
        "new_version": variant("new_version", {**config, "version": 99}),
        "nan_weights": variant("nan_weights", tensors={k: torch.full_like(v, float("nan"))
                                                       for k, v in tensors.items()}),
        "wrong_tensors": variant("wrong_tensors", tensors={"x": torch.zeros(3)}),
        "misshapen": variant("misshapen", tensors={**tensors, first: torch.zeros(tensors[first].numel())}),
        "not_json": variant("not_json", raw_config="{ not json"),
    }
    truncated = variant("truncated")
    data = (truncated / TENSORS_FILE).read_bytes()
    (truncated / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    out["truncated"] = truncated
    return out


def _load(folder):
    from lora_diffusion.files import load_tensors

    return load_tensors(folder / TENSORS_FILE)


def run_cli(capsys, argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_clear_line(capsys, tmp_path, files, argv, message):
    out = tmp_path / "out"
    names = {**{k: str(v) for k, v in files.items()}, "out": str(out)}
    code, _, err = run_cli(capsys, [a.format(**names) for a in argv])
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 2, err
    assert "error:" in last and re.search(message, last), last
    # nothing half-written: no adapter, no results
    assert not list(out.rglob(CONFIG_FILE)) if out.exists() else True
    assert not list(out.rglob("results.json")) if out.exists() else True


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60


def test_an_adapter_evaluates_on_a_new_file_without_a_train_file(capsys, tmp_path, files):
    reviews = write_lines(tmp_path / "new.jsonl", [json.dumps({"text": t, "label": lab}) for t, lab in
                                                   [("a great film", "positive"), ("an awful film", "negative")]])
    argv = [a.format(base=files["base"]) for a in EVAL] + [files["adapter"], "--task", "jsonl", "--eval-file", reviews]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n_eval"] == 2 and result["task"] == "new"
