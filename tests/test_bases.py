"""Every model family the backbone lists, on a tiny random model of its own layout.

Each family runs every method through the real pipeline: attach (starting at the base
where the method should), train two steps, save, reload to the same logits, generate,
detach back to the base. RoBERTa-style and ModernBERT bases get a byte-level BPE
tokenizer, as theirs are; the BERT-style ones the shipped wordpiece vocabulary.
"""

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from conftest import logits
from lora_diffusion.adapters import load_adapter
from lora_diffusion.backbone import FAMILIES, load_backbone, tiny_backbone
from lora_diffusion.data import collate, encode, load_task, response_length_for
from lora_diffusion.diffusion import DiffusionLM, sample
from lora_diffusion.errors import UserError
from lora_diffusion.methods import METHODS, make_method
from lora_diffusion.runs import fine_tune
from lora_diffusion.training import TrainConfig

# Every method with its defaults, and LoRA-Diffusion at its other injection sites.
VARIANTS = [(name, {}) for name in METHODS] + [
    ("lora_diffusion", {"injection": "blocks", "blocks_positions": "all"}),
    ("lora_diffusion", {"injection": "weights", "ranks": [4, 2, 1]}),
]
STARTS_AT_BASE = {"full", "lora_diffusion", "lora", "dora", "adapter", "bitfit", "nara", "tlora"}
# Special tokens as each family's own tokenizer names them.
BPE_SPECIALS = {
    "roberta": dict(cls_token="<s>", sep_token="</s>", pad_token="<pad>", mask_token="<mask>", unk_token="<unk>"),
    "modernbert": dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]"),
}
BPE_FAMILY = {"roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta", "modernbert": "modernbert"}


@pytest.fixture(scope="module")
def bpe_tokenizers():
    """A byte-level BPE vocabulary of 400 learnt from the built-in tasks (well under a second)."""
    texts = [f"{ex['instruction']} {ex['input']} {ex['response']}"
             for name in ("suite_sentiment", "suite_topic") for ex in load_task(name).train]
    made = {}
    for style, specials in BPE_SPECIALS.items():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=400, special_tokens=list(specials.values()))
        made[style] = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **specials)
    return made


def tiny_base(family, bpe_tokenizers):
    style = BPE_FAMILY.get(family)
    return tiny_backbone(seed=0, family=family, tokenizer=bpe_tokenizers[style] if style else None)


def first_batch(backbone, task):
    length = response_length_for(backbone.tokenizer, task.train)
    enc = encode(backbone.tokenizer, task.eval, length, backbone.max_length)
    return collate(enc, range(len(enc.prompts)), backbone.pad_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_tiny_base_of_every_family_loads_back_as_it_was(family, bpe_tokenizers, tmp_path):
    base = tiny_base(family, bpe_tokenizers)
    base.mlm.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path)
    task = load_task("suite_sentiment", max_train=8, max_eval=4)
    batch = first_batch(loaded, task)
    assert loaded.mlm.config.model_type == family and loaded.fingerprint() == base.fingerprint()
    assert torch.equal(logits(DiffusionLM(loaded), batch), logits(DiffusionLM(base), batch))
    assert len(loaded.blocks()) == 2 and loaded.max_length == 128  # RoBERTa's pad offset is not a position
    # the longest sequence the base claims is one it can run
    ids = torch.full((1, loaded.max_length), loaded.mask_id)
    ids[0, 0] = loaded.cls_id
    assert loaded.hidden_states(ids, torch.ones_like(ids)).shape == (1, loaded.max_length, loaded.hidden_size)


# BERT runs every method in test_methods too, and XLM-R and CamemBERT are RoBERTa's code
# under other names: two methods each (one acting after the body, one inside it) suffice.
CASES = [(family, name, options) for family in FAMILIES for name, options in VARIANTS
         if family not in ("bert", "xlm-roberta", "camembert") or name in ("lora_diffusion", "lora") and not options]


@pytest.mark.parametrize("family,name,options", CASES)
def test_every_method_trains_saves_reloads_generates_and_detaches_on_every_family(
        family, name, options, bpe_tokenizers, tmp_path):
    task = load_task("suite_sentiment", max_train=8, max_eval=4)
    base = tiny_base(family, bpe_tokenizers)
    batch = first_batch(base, task)
    before = logits(DiffusionLM(base), batch)
    if name in STARTS_AT_BASE:
        model, method = DiffusionLM(base), make_method(name, options)
        method.keep_base = True
        method.attach(model)
        assert torch.allclose(logits(model, batch), before, atol=1e-5)
        method.detach()

    method = make_method(name, options)
    method.keep_base = True  # so that full fine-tuning can detach too
    torch.manual_seed(0)
    result = fine_tune(base, task, method, TrainConfig(steps=2, batch_size=4, lr=1e-2, checkpoint_every=0),
                       out_dir=tmp_path, sampler_steps=2, monitor_examples=0, progress=False)
    trained = result["model"]
    expected = logits(trained, batch)
    assert not torch.allclose(expected, before)  # two steps at a high rate moved it

    reloaded, _, _ = load_adapter(tmp_path, base=tiny_base(family, bpe_tokenizers))
    assert torch.allclose(logits(reloaded, batch), expected, atol=1e-4)
    tokens, _ = sample(reloaded, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                       batch["instruction"], steps=2)
    answer = tokens[batch["response_mask"]]
    assert not (answer == base.mask_id).any() and int(answer.max()) < base.vocab_size

    method.detach()
    assert torch.equal(logits(trained, batch), before)


def test_an_unknown_family_is_refused():
    with pytest.raises(UserError, match="unknown family 'gpt2'; choose from: bert, roberta"):
        tiny_backbone(family="gpt2")


def _folder_with_its_own_code(tiny, folder):
    """A tiny BERT whose config.json maps to Python files in the folder; importing them leaves a mark."""
    import json

    tiny.mlm.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    mark = folder / "code-ran"
    (folder / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).write_text('yes')\n"
        "from transformers import BertConfig\n\n\nclass CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import BertForMaskedLM\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForMaskedLM(BertForMaskedLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-bert", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                     "AutoModelForMaskedLM": "modeling_custom.CustomForMaskedLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return mark


def test_a_base_that_brings_its_own_code_runs_it_only_with_trust_remote_code(tiny, tmp_path, capsys, monkeypatch):
    from test_cli import run_cli

    from lora_diffusion.paths import TRUST_REMOTE_CODE

    monkeypatch.delenv(TRUST_REMOTE_CODE, raising=False)
    mark = _folder_with_its_own_code(tiny, tmp_path / "base")
    argv = ["sample", "--base", str(tmp_path / "base"), "--prompt", "hello", "--steps", "1"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "brings its own Python code" in err and "--trust-remote-code" in err
    assert not mark.exists()  # refused before anything of it was imported

    monkeypatch.setenv(TRUST_REMOTE_CODE, "0")  # only "1" (what the flag sets) trusts
    with pytest.raises(UserError, match="brings its own Python code"):
        load_backbone(tmp_path / "base")
    code, _, err = run_cli(capsys, *argv, "--trust-remote-code")
    assert mark.read_text() == "yes"  # trusted: its code ran, and the base loaded
    assert code == 0, err
