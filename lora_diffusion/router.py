"""Multi-task composition of LoRA-Diffusion adapters (DESIGN.md section 2, the paper's Algorithm 1).

One adapter per task; at every denoising step the composed perturbation is

    delta_t = sum_j w_j(c) delta_t^(j),   w(c) = softmax(Router(Enc(c)))

with Enc(c) the mean of the frozen base's word embeddings of the instruction and the
router a 2-layer MLP (512 hidden). The weights can also be fixed (one adapter, a
uniform average, any mixture): that is how the interference matrix is measured.

The router is trained on the multi-task diffusion loss with every task adapter frozen
(`RouterMethod` plugs into the ordinary training loop), on instructions paraphrased
from the train list of `data.PARAPHRASES`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .methods.base import Method, freeze
from .methods.trajectory import LoRADiffusion, encode_instruction


COMPOSITION_FORMAT = "lora-diffusion-composition"


class Router(nn.Module):
    """Enc(c) -> softmax weights over M task adapters (2-layer MLP)."""

    def __init__(self, d_c: int, n_adapters: int, hidden: int = 512):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_c, hidden), nn.ReLU(), nn.Linear(hidden, n_adapters))

    def forward(self, encoding: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.mlp(encoding.to(self.mlp[0].weight.dtype)), dim=-1)


class Composition:
    """Several LoRA-Diffusion adapters on one model, mixed per instruction at every step."""

    def __init__(self, model, methods: list[LoRADiffusion], labels: list[str], router: Router | None = None):
        if not methods:
            raise UserError("composition needs at least one adapter")
        for m in methods:
            if m.options["injection"] != "final":
                raise UserError("only LoRA-Diffusion adapters with injection=final can be composed")
        self.model, self.methods, self.labels = model, methods, labels
        self.router = router
        self.fixed: torch.Tensor | None = None  # [M] weights that override the router
        self.paths: list[str] = []  # the adapters' folders, when loaded from disk
        model.step_hook = self._hook

    @classmethod
    def from_adapters(cls, paths, base=None, router_hidden: int = 512):
        """Load saved LoRA-Diffusion adapters (all on the same base) into one composed model."""
        from .backbone import load_backbone
        from .diffusion import DiffusionLM
        from .io import load_adapter, read_json

        configs = [read_json(_adapter_folder(p) / "adapter_config.json") for p in paths]
        for path, config in zip(paths, configs):
            if config["method"] != "lora_diffusion":
                raise UserError(f"{path} is a {config['method']} adapter; composition takes lora_diffusion adapters")
        backbone = load_backbone(base)
        model = DiffusionLM(backbone)
        methods = []
        for j, path in enumerate(paths):
            _, method, _ = load_adapter(path, base=backbone)  # checks the fingerprint, loads the state
            method.model = model
            model.add_module(f"task_{j}", method.adapter)
            methods.append(method)
        labels = [c["task"]["name"] for c in configs]
        router = Router(backbone.word_embeddings.embedding_dim, len(methods), router_hidden)
        model.add_module("router", router)
        model.eval()
        composition = cls(model, methods, labels, router)
        composition.paths = [str(_adapter_folder(p).resolve()) for p in paths]
        return composition

    def save(self, folder) -> None:
        """The router's weights + which adapters it mixes (safetensors + JSON)."""
        from pathlib import Path

        from .io import save_tensors, write_json

        folder = Path(folder)
        save_tensors(folder / "router.safetensors", {k: v.detach().cpu() for k, v in self.router.state_dict().items()})
        write_json(folder / "composition.json", {
            "format": COMPOSITION_FORMAT, "labels": self.labels, "adapters": self.paths,
            "router_hidden": self.router.mlp[0].out_features})

    @classmethod
    def load(cls, folder, base=None):
        """A saved composition: its task adapters (from their recorded folders) and its router."""
        from pathlib import Path

        from .io import load_tensors, read_json

        folder = Path(folder)
        spec = read_json(folder / "composition.json")
        if spec.get("format") != COMPOSITION_FORMAT:
            raise UserError(f"{folder} is not a saved lora-diffusion composition")
        missing = [p for p in spec["adapters"] if not _adapter_folder(p).is_dir()]
        if missing:
            raise UserError(f"the composition in {folder} needs adapters that are gone: {', '.join(missing)}")
        composition = cls.from_adapters(spec["adapters"], base, router_hidden=spec["router_hidden"])
        composition.router.load_state_dict(load_tensors(folder / "router.safetensors"))
        return composition

    def weights(self, instruction) -> torch.Tensor:
        """[B, M] mixture weights for a batch of instruction token ids."""
        n = len(self.methods)
        if self.fixed is not None:
            return self.fixed.to(instruction.device if instruction is not None else "cpu").expand(
                1 if instruction is None else instruction.shape[0], n)
        if instruction is None:
            raise UserError("the router needs an instruction; set fixed weights for plain text")
        return self.router(encode_instruction(self.model.backbone, instruction))

    def _hook(self, h, t, instruction):
        positions = self.model.step_context[2]
        w = self.weights(instruction).to(h.dtype)
        return sum(w[:, j, None, None] * m.perturbation(0, h, t, instruction, positions)
                   for j, m in enumerate(self.methods))

    def use(self, weights=None) -> None:
        """Fixed weights (a list of M numbers, e.g. one-hot or uniform), or None for the router."""
        self.fixed = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def instruction_weights(self, instructions: list[str]) -> torch.Tensor:
        """Router weights [len(instructions), M] for instruction strings."""
        tok = self.model.backbone.tokenizer
        ids = [tok(text, add_special_tokens=False)["input_ids"] for text in instructions]
        batch = torch.full((len(ids), max(map(len, ids))), self.model.backbone.pad_id, dtype=torch.long)
        for row, seq in enumerate(ids):
            batch[row, :len(seq)] = torch.tensor(seq)
        with torch.no_grad():
            return self.router(encode_instruction(self.model.backbone, batch.to(next(self.router.parameters()).device)))


class RouterMethod(Method):
    """Trains only the router of a Composition (every task adapter stays frozen)."""

    name = "router"
    default_lr = 1e-3

    def __init__(self, composition: Composition):
        super().__init__()
        self.composition = composition

    def attach(self, model) -> None:
        self.model = model
        for m in self.composition.methods:
            freeze(m.adapter)
        freeze(model.backbone.mlm)
        self.composition.use(None)

    def trainable_parameters(self):
        return {f"router.{n}": p for n, p in self.composition.router.named_parameters()}


def _adapter_folder(path):
    from pathlib import Path

    path = Path(path)
    return path / "adapter" if not (path / "adapter_config.json").is_file() and (path / "adapter").is_dir() else path
