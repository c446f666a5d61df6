"""Many adapters in one batch: each row of a batch decoded with its own adapter.

The frozen body runs once for the whole batch; each adapter acts on its own rows only:

* LoRA-Diffusion adapters (`final` or `blocks`) through a `Composition` whose rows are
  assigned (each adapter's modules gather its rows, then scatter their delta back);
* weight LoRA adapters through peft's mixed-batch inference: the adapters are loaded side
  by side into one peft model under their own names, and every LoRA layer is called with
  `adapter_names` (one name per row, "__base__" for a row that is not theirs).

Rows of other adapters (or of the base, index -1) see neither. Merged weights cannot serve
a mixed batch, so nothing here merges.
"""

from __future__ import annotations

import warnings

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from .adapters import adapter_folder, adapter_label, base_for, check_adapter
from .backbone import load_backbone
from .data import Encoded, collate, encode_prompt
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
            if config["method"] not in MIXABLE:
                raise UserError(f"adapter {adapter_label(path)} is {config['method']}: a mixed batch takes "
                                f"{' and '.join(MIXABLE)} adapters")
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
        tok, n = self.model.backbone.tokenizer, len(self.configs)
        length = length or max(c["response_length"] for c in self.configs)
        rows = [(text, j) for text in texts for j in range(n)]
        prompts = [encode_prompt(tok, instruction if instruction is not None else self.configs[j]["task"]["instruction"],
                                 text, length, self.model.backbone.max_length) for text, j in rows]
        enc = Encoded([p.prompts[0] for p in prompts], [p.responses[0] for p in prompts],
                      [p.instructions[0] for p in prompts], length)
        generator = torch.Generator().manual_seed(seed)
        device = next(self.model.parameters()).device
        decoded = []
        for start in range(0, len(rows), batch_size):
            idx = list(range(start, min(start + batch_size, len(rows))))
            self.assign([rows[i][1] for i in idx])
            batch = {k: v.to(device) for k, v in collate(enc, idx, self.model.backbone.pad_id).items()}
            tokens, _ = sample(self.model, **batch, steps=steps, generator=generator, **sampling)
            for row in range(len(idx)):
                ids = tokens[row][batch["response_mask"][row]].tolist()
                decoded.append(" ".join(tok.decode(ids, skip_special_tokens=False).replace(tok.sep_token, " | ").split()))
        return [decoded[i * n:(i + 1) * n] for i in range(len(texts))]

    def remove(self) -> None:
        """Take the hooks off (the model is not usable for mixed batches afterwards)."""
        if self.composition is not None:
            self.composition.remove()
        for hook in self._lora_hooks:
            hook.remove()


def _base_source(config: dict):
    source = config["base"]["source"]
    return None if source == "shipped" else source
