"""Multi-task composition of LoRA-Diffusion adapters (the paper's Algorithm 1).

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

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import adapter_folder, adapter_label, base_for, check_adapter
from .backbone import load_backbone
from .data import PARAPHRASES, collate, encode, load_task
from .diffusion import DiffusionLM, StepContext
from .errors import UserError
from .files import load_tensors, read_json, save_tensors, write_json
from .methods import Method, MethodConfig, stored_method
from .methods.base import freeze
from .methods.lora_diffusion import LoRADiffusion, StackedAdapters, block_output_hook, encode_instruction
from .training import TrainConfig, train

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

    def __init__(self, model: DiffusionLM, methods: list[LoRADiffusion], labels: list[str],
                 router: Router | None = None):
        if not methods:
            raise UserError("composition needs at least one adapter")
        if any(m.config.injection == "weights" for m in methods):
            raise UserError("only LoRA-Diffusion adapters with injection=final or blocks can be composed "
                            "(a weights adapter changes the projections themselves)")
        self.model, self.methods, self.labels = model, methods, labels
        self.router = router
        self.fixed: torch.Tensor | None = None  # [M] weights that override the router
        self.rows: torch.Tensor | None = None  # [B] adapter of each batch row (a mixed batch), or None
        self.paths: list[str] = []  # the adapters' folders, when loaded from disk
        self.configs: list[dict] = []  # and their adapter configs
        # Each adapter acts where it was trained: `final` ones on the last hidden states,
        # `blocks` ones after every block; at each site the mixture is sum_j w_j delta_j.
        # (No hook where no adapter acts: a step hook's output is read as the model's delta_t.)
        final = {j: m.final_delta for j, m in enumerate(methods) if m.config.injection == "final"}
        blocks = [j for j, m in enumerate(methods) if m.config.injection == "blocks"]
        self.stacks: list[tuple[list[int], torch.Tensor, StackedAdapters]] = []  # a mixed batch's, built on first use
        self.hooks = [model.add_step_hook(lambda h, context: self._mix(final, h, context, 0))] if final else []
        self.grad_through_body = model.grad_through_body
        if blocks:
            model.grad_through_body = True  # the router's weights act inside the body too
            self.hooks += [block.register_forward_hook(block_output_hook(self._block_mixer(i, blocks)))
                           for i, block in enumerate(model.backbone.blocks())]

    def remove(self) -> None:
        """Take the composition's hooks off the model (its modules stay)."""
        for hook in self.hooks:
            hook.remove()
        self.model.grad_through_body = self.grad_through_body

    @classmethod
    def from_adapters(cls, paths, base=None, router_hidden: int = 512, seed: int = 0) -> "Composition":
        """Load saved LoRA-Diffusion adapters (all on the same base) into one composed model.

        The router starts from an initialisation drawn with `seed` (so a trained router is
        reproducible); the task adapters hold their saved state.
        """
        checked = [check_adapter(p) for p in paths]
        configs = [config for config, _ in checked]
        for path, config in zip(paths, configs):
            if config["method"] != "lora_diffusion":
                raise UserError(f"{path} is a {config['method']} adapter; composition takes lora_diffusion adapters")
        backbone = load_backbone(base)
        model = DiffusionLM(backbone)
        methods = []
        for j, (path, (config, tensors)) in enumerate(zip(paths, checked)):
            base_for(config, backbone, where=f"adapter {adapter_label(path)}")  # the fingerprint must match
            method = stored_method("lora_diffusion", config["options"])
            method.add_modules(model, f"task_{j}")  # no hook of its own: the composition mixes them
            method.load_state_dict(tensors)
            methods.append(method)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            router = Router(backbone.word_embeddings.embedding_dim, len(methods), router_hidden)
        model.add_module("router", router)
        model.eval()
        composition = cls(model, methods, [c["task"]["name"] for c in configs], router)
        composition.paths = [str(adapter_folder(p).resolve()) for p in paths]
        composition.configs = configs
        return composition

    def save(self, folder) -> None:
        """The router's weights + which adapters it mixes (safetensors + JSON)."""
        folder = Path(folder)
        save_tensors(folder / "router.safetensors", {k: v.detach().cpu() for k, v in self.router.state_dict().items()})
        write_json(folder / "composition.json", {
            "format": COMPOSITION_FORMAT, "labels": self.labels, "adapters": self.paths,
            "router_hidden": self.router.mlp[0].out_features})

    @classmethod
    def load(cls, folder, base=None) -> "Composition":
        """A saved composition: its task adapters (from their recorded folders) and its router."""
        folder = Path(folder)
        spec = read_json(folder / "composition.json")
        if spec.get("format") != COMPOSITION_FORMAT:
            raise UserError(f"{folder} is not a saved lora-diffusion composition")
        missing = [p for p in spec["adapters"] if not adapter_folder(p).is_dir()]
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

    def _block_mixer(self, site: int, blocks: list[int]):
        """h -> the mixture after block `site` of the `blocks` adapters (indices into self.methods)."""
        acting = {j: functools.partial(self.methods[j].block_delta, site) for j in blocks}
        return lambda h: self._mix(acting, h, self.model.step_context, site)

    def _mix(self, acting: dict, h, context: StepContext, site: int):
        """sum_j w_j delta_j over the adapters `acting` at this site (j -> delta_of(h, context);
        `site`: the index of the site among its adapters' own)."""
        if context is None:
            raise UserError("a composition acts at a denoising step: run the model through DiffusionLM")
        if self.rows is not None:
            return self._each_row_its_adapter(acting, h, context, site)
        w = self.weights(context.instruction).to(h.dtype)
        return sum(w[:, j, None, None] * delta_of(h, context).to(h.dtype) for j, delta_of in acting.items())

    def _each_row_its_adapter(self, acting: dict, h, context: StepContext, site: int):
        """A mixed batch: each row's delta from its own adapter alone. Adapters of one shape share a
        stack (one batched pass for all their rows); until they are calibrated (their first batch),
        each adapter's modules run on its own rows (gathered, then scattered back)."""
        rows = self.rows.to(h.device)
        if rows.shape[0] != h.shape[0]:
            raise UserError(f"the batch has {h.shape[0]} rows but {rows.shape[0]} were assigned adapters")
        if not self.stacks or self.stacks[0][2].device != h.device:  # none yet, or the model moved
            self.stacks = self._stack()
        if self.stacks:
            delta = torch.zeros_like(h)
            for members, place, stack in self.stacks:
                if members[0] in acting:  # a stack's adapters all act at the same sites
                    delta = delta + stack.delta(site, h, context, place[rows]).to(h.dtype)
            return delta
        delta = torch.zeros_like(h)
        for j, delta_of in acting.items():
            mine = (rows == j).nonzero().squeeze(1)
            if len(mine):
                own = StepContext(*(None if x is None else x[mine] for x in context))
                delta[mine] = delta_of(h[mine], own).to(h.dtype)
        return delta

    def _stack(self) -> list:
        """[(adapter indices, place, their StackedAdapters)], one per shape; [] while any is uncalibrated.

        place[j] is adapter j's slot in its stack; every other adapter (and -1, the base's rows,
        which indexes the last entry) maps to the stack's zero slot."""
        shapes: dict[tuple, list[int]] = {}
        for j, method in enumerate(self.methods):
            shapes.setdefault(StackedAdapters.shape(method), []).append(j)
        groups = list(shapes.values())
        if not all(StackedAdapters.can_stack([self.methods[j] for j in members]) for members in groups):
            return []
        stacks = []
        for members in groups:
            stack = StackedAdapters([self.methods[j] for j in members])
            place = torch.full((len(self.methods) + 1,), len(members), device=stack.device)
            place[members] = torch.arange(len(members), device=stack.device)
            stacks.append((members, place, stack))
        return stacks

    def use(self, weights=None) -> None:
        """Fixed weights (a list of M numbers, e.g. one-hot or uniform), or None for the router."""
        self.rows = None
        self.stacks = []  # a mixed batch's copies: rebuilt from the adapters when one comes again
        self.fixed = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def assign(self, rows) -> None:
        """A mixed batch: row i of every batch is decoded with adapter rows[i] alone (0..M-1),
        or by the base alone (-1)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.ndim != 1 or len(rows) == 0 or int(rows.min()) < -1 or int(rows.max()) >= len(self.methods):
            raise UserError(f"assign one adapter (0 to {len(self.methods) - 1}, or -1 for none) to each row")
        self.fixed, self.rows = None, rows

    def instruction_weights(self, instructions: list[str]) -> torch.Tensor:
        """Router weights [len(instructions), M] for instruction strings."""
        tok = self.model.backbone.tokenizer
        ids = [tok(text, add_special_tokens=False)["input_ids"] for text in instructions]
        batch = torch.full((len(ids), max(map(len, ids))), self.model.backbone.pad_id, dtype=torch.long)
        for row, seq in enumerate(ids):
            batch[row, :len(seq)] = torch.tensor(seq)
        with torch.no_grad():
            return self.router(encode_instruction(self.model.backbone, batch.to(next(self.router.parameters()).device)))


@dataclass
class RouterConfig(MethodConfig):
    method = "router"

    def default_lr(self) -> float:
        return 1e-3


class RouterMethod(Method):
    """Trains only the router of a Composition (every task adapter stays frozen)."""

    name = "router"
    Config = RouterConfig

    def __init__(self, composition: Composition):
        super().__init__()
        self.composition = composition

    def attach(self, model) -> None:
        self.model = model
        for m in self.composition.methods:
            freeze(m.trajectory)
        freeze(model.backbone.mlm)
        self.composition.use(None)

    def trainable_parameters(self):
        return {f"router.{n}": p for n, p in self.composition.router.named_parameters()}


# ---------------------------------------------------------------------------------------
# Training the router
# ---------------------------------------------------------------------------------------

def _paraphrased(examples: list[dict], instructions: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{**ex, "instruction": rng.choice(instructions)} for ex in examples]


def train_router(composition: Composition, tasks: dict, configs: dict, steps: int = 300, batch_size: int = 16,
                 lr: float = 1e-3, seed: int = 0, max_train: int = 2000, out_dir=None, progress: bool = True) -> dict:
    """Train the router on the tasks' training data with paraphrased instructions (train list)."""
    torch.manual_seed(seed)  # the base's dropout in training mode draws from here
    tok = composition.model.backbone.tokenizer
    encoded = []
    for j, name in enumerate(composition.labels):
        task, config = tasks[name], configs[name]
        instructions = [task.train[0]["instruction"]] + PARAPHRASES.get(name, {}).get("train", [])
        examples = _paraphrased(task.train[:max_train], instructions, seed + j)
        encoded.append(encode(tok, examples, config["response_length"], config["max_length"], truncate=True))
    order = [list(range(len(e.prompts))) for e in encoded]

    def batch_for_step(step: int, micro: int) -> dict:
        j = step % len(encoded)  # the tasks take turns
        rng = random.Random(seed * 7919 + step)
        return collate(encoded[j], rng.sample(order[j], min(batch_size, len(order[j]))),
                       composition.model.backbone.pad_id)

    method = RouterMethod(composition)
    method.attach(composition.model)
    return train(composition.model, method, batch_for_step, TrainConfig(steps=steps, batch_size=batch_size,
                 lr=lr, seed=seed, checkpoint_every=0, log_every=10), out_dir=out_dir, progress=progress)


def trained_composition(ld_adapters, base=None, data_dir=None, max_train: int | None = None,
                        max_eval: int | None = None, seed: int = 0, router_steps: int = 300, router_lr: float = 1e-3,
                        router_batch: int = 16, out_dir=None, progress: bool = True):
    """A router over LoRA-Diffusion adapters (one per task), trained on their tasks' instructions.

    Returns (composition, tasks, adapter configs, the router's training summary); the
    tasks are loaded with `max_train` / `max_eval` for the caller to evaluate on.
    """
    composition = Composition.from_adapters(ld_adapters, base, seed=seed)
    names = composition.labels
    if len(set(names)) != len(names):
        raise UserError(f"one adapter per task, please; these are for {', '.join(names)}")
    configs = dict(zip(names, composition.configs))
    tasks = {name: load_task(name, data_dir=data_dir, max_train=max_train, max_eval=max_eval, seed=seed)
             for name in names}
    summary = train_router(composition, tasks, configs, steps=router_steps, batch_size=router_batch, lr=router_lr,
                           seed=seed, out_dir=out_dir, progress=progress)
    return composition, tasks, configs, summary
