"""Many adapters in one batch: each row of a batch decoded with its own adapter.

The frozen body runs once for the whole batch; each adapter acts on its own rows only:

* LoRA-Diffusion adapters (`final` or `blocks`) through a `Composition` whose rows are
  assigned (adapters of one shape stacked, each row gathering its own adapter's weights:
  `methods.lora_diffusion.StackedAdapters`);
* weight LoRA adapters through peft's mixed-batch inference: the adapters are loaded side
  by side into one peft model under their own names, and every LoRA layer is called with
  `adapter_names` (one name per row, "__base__" for a row that is not theirs).

Rows of other adapters (or of the base, index -1) see neither. Merged weights cannot serve
a mixed batch, so nothing here merges.

`side_by_side` answers a list of texts with several columns at once (the base, adapters of any
method, routers): LoRA-Diffusion and weight-LoRA adapters and the base share mixed batches, the
other columns are decoded alone.
"""

from __future__ import annotations

import warnings

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from .adapters import (adapter_folder, adapter_label, base_for, check_adapter, load_model, read_adapter_config,
                       task_instruction)
from .backbone import load_backbone
from .data import Encoded, answer_ids, collate, encode_prompt
from .diffusion import DiffusionLM, sample
from .errors import UserError
from .methods import stored_method
from .router import Composition

BASE_ROW = -1  # a row decoded by the base alone
PEFT_BASE = "__base__"  # peft's name for "no adapter on this row"
MIXABLE = ("lora_diffusion", "lora")


class MixedAdapters:
    """Saved adapters on one base, ready to decode batches whose rows each pick one of them."""

    def __init__(self, paths, base=None):
        if not paths:
            raise UserError("give at least one adapter to mix")
        checked = [check_adapter(p) for p in paths]
        backbone = load_backbone(base if base is not None else _base_source(checked[0][0]))
        for path, (config, _) in zip(paths, checked):
            base_for(config, backbone, where=f"adapter {adapter_label(path)}")  # all on this one base
            if not mixable(config):
                why = ("LoRA-Diffusion with injection=weights: it changes the base's projections, so it cannot "
                       "share a mixed batch; decode it alone" if config["method"] == "lora_diffusion" else
                       f"{config['method']}: a mixed batch takes {' and '.join(MIXABLE)} adapters")
                raise UserError(f"adapter {adapter_label(path)} is {why}")
        self.model = DiffusionLM(backbone)
        self.configs = [config for config, _ in checked]
        self.labels = [adapter_label(p) for p in paths]
        self.paths = [str(adapter_folder(p)) for p in paths]
        # index of each adapter among those of its kind
        self._ld = [i for i, c in enumerate(self.configs) if c["method"] == "lora_diffusion"]
        self._lora = [i for i, c in enumerate(self.configs) if c["method"] == "lora"]
        self.composition = self._load_ld([checked[i] for i in self._ld])
        self.peft_model, self._lora_hooks = self._load_lora([checked[i] for i in self._lora])
        self._peft_rows: list[str] | None = None
        self.model.eval()

    def _load_ld(self, checked) -> Composition | None:
        if not checked:
            return None
        methods = []
        for j, (config, tensors) in enumerate(checked):
            method = stored_method("lora_diffusion", config["options"])
            method.add_modules(self.model, f"task_{j}")  # no hook of its own: the composition mixes them
            method.load_state_dict(tensors)
            methods.append(method)
        return Composition(self.model, methods, [self.labels[i] for i in self._ld])

    def _load_lora(self, checked):
        """One peft model holding every weight LoRA adapter under its own name ("a0", "a1", ...)."""
        if not checked:
            return None, []
        mlm = self.model.backbone.mlm
        peft_model = None
        for j, (config, tensors) in enumerate(checked):
            method = stored_method("lora", config["options"])
            name = f"a{j}"
            with warnings.catch_warnings():  # a deprecation inside peft, not ours to act on
                warnings.simplefilter("ignore", FutureWarning)
                if peft_model is None:
                    peft_model = get_peft_model(mlm, method.peft_config(self.model.backbone), adapter_name=name)
                else:
                    peft_model.add_adapter(name, method.peft_config(self.model.backbone))
            # the file names the tensors of peft's "default" adapter: here, of adapter `name`
            params = dict(mlm.named_parameters())
            expected = {k for k in params if f".{name}." in k}
            renamed = {k.replace(".default.", f".{name}."): v for k, v in tensors.items()}
            if set(renamed) != expected:
                raise UserError(f"adapter {self.labels[self._lora[j]]}: its tensors do not fit its options")
            with torch.no_grad():
                for k, v in renamed.items():
                    params[k].copy_(v.to(params[k].dtype))
        peft_model.requires_grad_(False)
        hooks = [module.register_forward_pre_hook(self._pass_adapter_names, with_kwargs=True)
                 for module in mlm.modules() if isinstance(module, LoraLayer)]
        return peft_model, hooks

    def _pass_adapter_names(self, module, args, kwargs):
        """Every LoRA layer is told which adapter each row uses (peft's mixed-batch forward)."""
        if self._peft_rows is None:
            raise UserError("assign each row an adapter before decoding a mixed batch")
        return args, {**kwargs, "adapter_names": self._peft_rows}

    def assign(self, rows) -> None:
        """Row i of every batch that follows is decoded with adapter rows[i] (an index into the
        adapters given, or -1 for the base alone)."""
        rows = [int(r) for r in rows]
        if not rows or min(rows) < BASE_ROW or max(rows) >= len(self.configs):
            raise UserError(f"assign each row an adapter from 0 to {len(self.configs) - 1} (or -1: the base)")
        if self.composition is not None:
            self.composition.assign([self._ld.index(r) if r in self._ld else BASE_ROW for r in rows])
        if self.peft_model is not None:
            self._peft_rows = [f"a{self._lora.index(r)}" if r in self._lora else PEFT_BASE for r in rows]

    @torch.no_grad()
    def answers(self, texts: list[str | None], steps: int = 64, length: int | None = None,
                instruction: str | None = None, batch_size: int = 64, seed: int = 0, **sampling) -> list[list[str]]:
        """Every text decoded by every adapter, in mixed batches: answers[text][adapter].

        Each adapter reads its own task's instruction (unless `instruction` is given); the
        response length is the longest of the adapters' (or `length`). `sampling`: the rest of
        `sample`'s options (remasking, temperature, block_length, threshold).
        """
        n = len(self.configs)
        length = length or max(c["response_length"] for c in self.configs)
        rows = [(text, j) for text in texts for j in range(n)]
        prompts = [(instruction if instruction is not None else task_instruction(self.configs[j]), text)
                   for text, j in rows]
        decoded = decode(self.model, prompts, length, steps, batch_size, seed,
                         before_batch=lambda idx: self.assign([rows[i][1] for i in idx]), **sampling)
        return [decoded[i * n:(i + 1) * n] for i in range(len(texts))]

    def remove(self) -> None:
        """Take the hooks off (the model is not usable for mixed batches afterwards)."""
        if self.composition is not None:
            self.composition.remove()
        for hook in self._lora_hooks:
            hook.remove()


def mixable(config: dict) -> bool:
    """Whether an adapter with this config can share a mixed batch: weight LoRA, and LoRA-Diffusion
    acting on the hidden states (`final`, `blocks`; a `weights` one changes the projections)."""
    return config["method"] in MIXABLE and config["options"].get("injection") != "weights"


@torch.no_grad()
def decode(model: DiffusionLM, prompts: list[tuple[str, str | None]], length: int, steps: int, batch_size: int = 64,
           seed: int = 0, before_batch=None, until_sep: bool = False, **sampling) -> list[str]:
    """The response `model` decodes for each (instruction, text) prompt, in batches of `batch_size`
    (`before_batch(indices)` runs before each: a mixed batch assigns its rows there).

    Each is the whole response, `[SEP]` shown as ' | ' (as `sample` prints it), or with `until_sep`
    the answer before the first `[SEP]` (as the Generate tab and the evaluation read it)."""
    tok = model.backbone.tokenizer
    encoded = [encode_prompt(tok, ins, text, length, model.backbone.max_length) for ins, text in prompts]
    enc = Encoded([p.prompts[0] for p in encoded], [p.responses[0] for p in encoded],
                  [p.instructions[0] for p in encoded], length)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    decoded = []
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        if before_batch:
            before_batch(idx)
        batch = {k: v.to(device) for k, v in collate(enc, idx, model.backbone.pad_id).items()}
        tokens, _ = sample(model, **batch, steps=steps, generator=generator, **sampling)
        for row in range(len(idx)):
            ids = tokens[row][batch["response_mask"][row]].tolist()
            if until_sep:
                decoded.append(tok.decode(answer_ids(ids, model.backbone.sep_id), skip_special_tokens=True))
            else:
                text = tok.decode(ids, skip_special_tokens=False).replace(tok.sep_token, " | ")
                decoded.append(" ".join(text.split()))
    return decoded


def side_by_side(texts: list[str], columns: list, base=None, instruction: str | None = None,
                 length: int | None = None, batch_size: int = 64) -> list[list[str]]:
    """Every text answered by every column: answers[text][column], each the answer before its first [SEP].

    A column is None (the base alone), a saved adapter's folder, or a `Composition` (a router over
    LoRA-Diffusion adapters, weighting them by the instruction). LoRA-Diffusion and weight-LoRA
    adapters share mixed batches, with the base's rows riding along (`MixedAdapters`); any other
    method and a router decode alone, as `load_model` serves them. Decoding is greedy with one
    step per answer position, so each answer is what that column gives alone.

    `instruction`: what every column reads; None: each adapter its own task's, the base and a
    router the first adapter's (else the router's first task's). `length`: the response positions;
    None: the longest any column's adapters were trained with.
    """
    if not texts or not columns:
        raise UserError("give one or more texts and one or more columns (adapters, or the base)")
    configs = [[] if c is None else c.configs if isinstance(c, Composition) else [read_adapter_config(c)]
               for c in columns]
    own = [task_instruction(cs[0]) for c, cs in zip(columns, configs) if cs and not isinstance(c, Composition)]
    routed = [task_instruction(cs[0]) for c, cs in zip(columns, configs) if cs and isinstance(c, Composition)]
    shared = instruction if instruction is not None else next(iter(own + routed), None)
    if shared is None:
        raise UserError("type an instruction: the base model has no task of its own")
    reads = [task_instruction(cs[0]) if instruction is None and cs and not isinstance(c, Composition) else shared
             for c, cs in zip(columns, configs)]
    length = length or max((cfg["response_length"] for cs in configs for cfg in cs), default=None)
    if not length:
        raise UserError("give the response length: the base model has none of its own")
    answers = [[""] * len(columns) for _ in texts]
    mix = [k for k, (c, cs) in enumerate(zip(columns, configs)) if cs and not isinstance(c, Composition)
           and mixable(cs[0])]
    riding = [k for k, c in enumerate(columns) if c is None] if mix else []
    if mix:
        mixed = MixedAdapters([columns[k] for k in mix], base=base)
        row_of = {k: mix.index(k) if k in mix else BASE_ROW for k in mix + riding}
        rows = [(i, k) for i in range(len(texts)) for k in mix + riding]
        decoded = decode(mixed.model, [(reads[k], texts[i]) for i, k in rows], length, length, batch_size,
                         before_batch=lambda idx: mixed.assign([row_of[rows[r][1]] for r in idx]), until_sep=True)
        for (i, k), answer in zip(rows, decoded):
            answers[i][k] = answer
        mixed.remove()
    for k, column in enumerate(columns):
        if k in mix or k in riding:
            continue
        model = column.model if isinstance(column, Composition) else load_model(column, base=base)[0]
        for i, answer in enumerate(decode(model, [(reads[k], t) for t in texts], length, length, batch_size,
                                          until_sep=True)):
            answers[i][k] = answer
    return answers


def _base_source(config: dict):
    source = config["base"]["source"]
    return None if source == "shipped" else source
