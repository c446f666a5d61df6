"""Loading a base: the shipped MiniLM diffusion LM, any local masked-LM folder, or a tiny random model.

A `Backbone` splits a `transformers` masked LM into its body (tokens -> final hidden
states `h`) and its LM head (`h` -> logits). The split is where a trajectory adapter
acts: it perturbs `h` before the head reads it (LoRA-Diffusion's `final` injection).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

from .errors import UserError
from .paths import SHIPPED_BASE, remote_code_trusted


class _Sequential(nn.Module):
    """Chain of callables (some HF heads keep their activation as a plain function)."""

    def __init__(self, *parts):
        super().__init__()
        self.parts = list(parts)
        for i, part in enumerate(parts):
            if isinstance(part, nn.Module):
                self.add_module(f"part{i}", part)

    def forward(self, x):
        for part in self.parts:
            x = part(x)
        return x


def _split_body_and_head(mlm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Find the encoder body and the LM head of the known masked-LM families."""
    kind = mlm.config.model_type
    if hasattr(mlm, "cls") and hasattr(mlm, "bert"):  # BERT, MiniLM
        return mlm.bert, mlm.cls
    if hasattr(mlm, "lm_head"):  # RoBERTa, XLM-R, CamemBERT, ...
        return mlm.base_model, mlm.lm_head
    if hasattr(mlm, "vocab_projector"):  # DistilBERT
        return mlm.distilbert, _Sequential(mlm.vocab_transform, mlm.activation,
                                           mlm.vocab_layer_norm, mlm.vocab_projector)
    if hasattr(mlm, "head") and hasattr(mlm, "decoder"):  # ModernBERT
        return mlm.model, _Sequential(mlm.head, mlm.decoder)
    if hasattr(mlm, "generator_lm_head"):  # ELECTRA's generator (the masked LM half)
        return mlm.electra, _Sequential(mlm.generator_predictions, mlm.generator_lm_head)
    raise UserError(f"model type {kind!r} is not supported as a base: need a BERT-, RoBERTa-, "
                    "DistilBERT-, ELECTRA- or ModernBERT-style masked LM")


# Where the projections of a transformer block live, per model family, as regexes over
# module names (used by weight LoRA / DoRA through peft and by the bottleneck adapters).
_BERT_LIKE = {"q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value",
              "o": r"attention\.output\.dense", "ffn_in": r"intermediate\.dense", "ffn_out": r"layer\.\d+\.output\.dense"}
PROJECTIONS = {
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE, "xlm-roberta": _BERT_LIKE, "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": {"q": r"attention\.q_lin", "k": r"attention\.k_lin", "v": r"attention\.v_lin",
                   "o": r"attention\.out_lin", "ffn_in": r"ffn\.lin1", "ffn_out": r"ffn\.lin2"},
    "modernbert": {"qkv": r"attn\.Wqkv", "o": r"attn\.Wo", "ffn_in": r"mlp\.Wi", "ffn_out": r"mlp\.Wo"},
}
FAMILIES = tuple(PROJECTIONS)  # the model types a base may have (each tested on a tiny random model)
# RoBERTa-style embeddings number positions from pad_token_id + 1, so that many of the
# position table's rows are never a real position.
_POSITIONS_AFTER_PAD = {"roberta", "xlm-roberta", "camembert"}


class Backbone(nn.Module):
    """A bidirectional masked LM seen as `hidden_states()` followed by `logits()`."""

    def __init__(self, mlm: nn.Module, tokenizer, source: str = "memory"):
        super().__init__()
        self.mlm = mlm
        self.tokenizer = tokenizer
        self.source = source
        self.body, self.head = _split_body_and_head(mlm)
        for name in ("mask_token_id", "pad_token_id", "sep_token_id", "cls_token_id"):
            if getattr(tokenizer, name) is None:
                raise UserError(f"the tokenizer of {source} has no {name[:-9]} token; "
                                "a masked diffusion LM needs [MASK], [PAD], [SEP] and [CLS]")
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id
        self.sep_id = tokenizer.sep_token_id
        self.cls_id = tokenizer.cls_token_id
        # SUBS parameterisation: the denoiser never predicts [MASK]; nor the layout tokens.
        never = torch.zeros(mlm.config.vocab_size, dtype=torch.bool)
        never[[self.mask_id, self.pad_id, self.cls_id]] = True
        self.register_buffer("never_predict", never, persistent=False)

    @property
    def hidden_size(self) -> int:
        return self.mlm.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.mlm.config.vocab_size

    @property
    def max_length(self) -> int:
        """The longest sequence the position table serves."""
        config = self.mlm.config
        if config.model_type in _POSITIONS_AFTER_PAD:
            return config.max_position_embeddings - config.pad_token_id - 1
        return config.max_position_embeddings

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.mlm.get_input_embeddings()

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks of the body, in order (their outputs are the block hidden states)."""
        n = self.mlm.config.num_hidden_layers
        for module in self.body.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return module
        raise UserError(f"cannot find the {n} transformer blocks of {self.source}")

    def projection_pattern(self, *kinds: str) -> str:
        """Regex (peft's `target_modules` form) matching the named block projections.

        kinds: q, k, v, o (attention), ffn_in, ffn_out (MLP). A fused q/k/v projection
        (ModernBERT) stands in for any of q, k, v.
        """
        table = PROJECTIONS.get(self.mlm.config.model_type)
        if table is None:
            raise UserError(f"no projection names known for model type {self.mlm.config.model_type!r}; "
                            f"known: {', '.join(sorted(PROJECTIONS))}")
        names = []
        for kind in kinds:
            name = table.get(kind) or (table.get("qkv") if kind in "qkv" else None)
            if name and name not in names:
                names.append(name)
        return r".*\.(" + "|".join(names) + r")$"

    def projections(self, *kinds: str) -> dict[str, nn.Linear]:
        """Name in the body -> nn.Linear, for every block's projections of these kinds, in the body's order."""
        pattern = re.compile(self.projection_pattern(*kinds))
        found = {name: module for name, module in self.body.named_modules()
                 if isinstance(module, nn.Linear) and pattern.fullmatch(name)}
        if not found:
            raise UserError(f"found no {'/'.join(kinds)} projections (nn.Linear) in {self.source}")
        return found

    def hidden_states(self, input_ids, attention_mask):
        """Final hidden states `h` [B, L, d] (before the LM head)."""
        return self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def logits(self, h):
        """LM-head logits for hidden states of any leading shape; never-predicted ids get -inf."""
        out = self.head(h).float()
        return out.masked_fill(self.never_predict, float("-inf"))

    @property
    def label(self) -> str:
        """How files name this base: "shipped" for the shipped one, else where it came from."""
        try:
            if Path(self.source).resolve() == Path(SHIPPED_BASE).resolve():
                return "shipped"
        except (OSError, ValueError):
            pass
        return self.source

    def fingerprint(self) -> str:
        """Short hash of the base's weights, so an adapter can refuse the wrong base."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.mlm.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            flat = tensor.detach().float().flatten()
            digest.update(flat[:: max(1, flat.numel() // 256)].numpy().tobytes())
        return digest.hexdigest()[:16]


def load_backbone(path: str | os.PathLike | None = None, dtype=torch.float32) -> Backbone:
    """Load a base from a local folder (default: the shipped one) or, online, a hub name.

    `path` may be a folder with `config.json` + weights + tokenizer, or `hf:NAME` to let
    `transformers` download NAME from the hub (needs a network).
    """
    path = str(path) if path is not None else str(SHIPPED_BASE)
    if path.startswith("hf:"):
        name, local_only = path[3:], False
    else:
        folder = Path(path)
        if not folder.is_dir():
            hint = " (run `lora-diffusion prepare-base` to build it)" if folder == SHIPPED_BASE else ""
            raise UserError(f"base model folder not found: {path}{hint}")
        if not (folder / "config.json").is_file():
            raise UserError(f"{path} is not a model folder: it has no config.json")
        _refuse_remote_code(folder)
        name, local_only = path, True
    trusted = remote_code_trusted()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only, trust_remote_code=trusted)
        # safetensors only: a pytorch_model.bin would be unpickled, and a model folder comes from anyone
        mlm = AutoModelForMaskedLM.from_pretrained(name, local_files_only=local_only, dtype=dtype,
                                                   use_safetensors=True, trust_remote_code=trusted)
    except Exception as err:  # a corrupt file raises whatever its parser raises (safetensors, json, tokenizers)
        if "trust_remote_code" in str(err) and not trusted:
            raise UserError(f"{path} brings its own Python code; it runs on load, so it is refused unless you "
                            "trust its author and pass --trust-remote-code") from None
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load a masked LM from {path}: {first_line}") from None
    mlm.eval()
    return Backbone(mlm, tokenizer, source=path)


def _refuse_remote_code(folder: Path) -> None:
    """A folder whose config maps to its own Python files runs them on load: only when trusted."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{folder}/config.json is not readable JSON: {err}") from None
    if isinstance(config, dict) and config.get("auto_map") and not remote_code_trusted():
        raise UserError(f"{folder} brings its own Python code (config.json auto_map); it runs on load, so "
                        "it is refused unless you trust its author and pass --trust-remote-code")


def tiny_backbone(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2,
                  max_length: int = 128, tokenizer=None, family: str = "bert") -> Backbone:
    """A from-scratch masked LM of a few hundred thousand body parameters, for tests (seconds to build).

    `family`: any of FAMILIES, in its own layout (ELECTRA with a narrower embedding, as its
    generators have). The tokenizer defaults to the shipped base's wordpiece vocabulary
    (always in the repo).
    """
    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose from: {', '.join(FAMILIES)}")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_BASE), local_files_only=True)
    sizes = {"vocab_size": len(tokenizer), "hidden_size": hidden, "num_hidden_layers": layers,
             "num_attention_heads": heads, "intermediate_size": 4 * hidden, "max_position_embeddings": max_length,
             "pad_token_id": tokenizer.pad_token_id}
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    extra = {
        "bert": no_dropout, "roberta": no_dropout, "xlm-roberta": no_dropout, "camembert": no_dropout,
        "electra": {**no_dropout, "embedding_size": hidden // 2},
        "distilbert": {"dim": hidden, "n_layers": layers, "n_heads": heads, "hidden_dim": 4 * hidden,
                       "dropout": 0.0, "attention_dropout": 0.0},
        "modernbert": {"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
                       "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
                       "global_attn_every_n_layers": 2, "local_attention": 16},
    }[family]
    if family in _POSITIONS_AFTER_PAD:
        sizes["max_position_embeddings"] = max_length + tokenizer.pad_token_id + 1
    config = AutoConfig.for_model(family, **sizes, **extra)
    torch.manual_seed(seed)
    mlm = AutoModelForMaskedLM.from_config(config)
    mlm.eval()
    return Backbone(mlm, tokenizer, source=f"tiny-random({family}, seed={seed})")


def read_card(path: str | os.PathLike | None = None) -> dict:
    """The JSON card written beside a prepared base (empty if there is none)."""
    card = Path(path or SHIPPED_BASE) / "card.json"
    return json.loads(card.read_text()) if card.is_file() else {}
