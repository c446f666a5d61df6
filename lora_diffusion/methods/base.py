"""The interface every fine-tuning method implements, and the config each one is built from.

A method is two things, as in PEFT's tuners:

* a config, a dataclass whose fields are the method's options. Each field is declared
  with `option(default, help, ...)`: its type (from the annotation), its help text and
  its allowed values live there and nowhere else. The CLI's `--option` parsing and
  help, the app's controls, the saved `adapter_config.json` and the compare presets
  are checked against it. Values may come typed (from code or the app) or as text (from
  the CLI); `from_options` coerces and checks both the same way. A value that follows
  from others (LoRA's alpha = 2r, LoRA-Diffusion's ranks from the schedule) is left as
  none and derived by a method of the config, never stored twice.
* the method itself: `attach` to a `DiffusionLM` (freeze what it does not train, add its
  modules and hooks), `detach` (remove all of it: the base computes exactly what it
  computed before), its trainable parameters, and the state its adapter file holds.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..distributed import assign
from ..errors import UserError
from ..files import tensor_bytes


def option(default, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None):
    """A config field: its default, a one-line help text, and the values it accepts."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class OptionSpec:
    """One option as the CLI and the app present it."""

    name: str
    kind: type            # int, float, bool, str, or tuple (of `item` values)
    item: type | None     # the element type of a tuple option
    length: int | None    # a tuple option's fixed length
    optional: bool        # None is allowed (meaning: derived from the other options)
    default: Any
    help: str
    choices: tuple | None
    min: float | None
    max: float | None


@dataclass
class MethodConfig:
    """Base of every method's config: validation of each field, then `check()` across fields."""

    method: ClassVar[str] = "method"

    def __post_init__(self):
        for spec in self.specs():
            setattr(self, spec.name, _coerce(self.method, spec, getattr(self, spec.name)))
        self.check()

    def check(self) -> None:
        """Checks and derived values that involve several fields (subclasses)."""

    def default_lr(self) -> float:
        raise NotImplementedError

    def changed(self, name: str) -> bool:
        """Whether option `name` was given a value other than its default."""
        return getattr(self, name) != self.__dataclass_fields__[name].default

    @classmethod
    def specs(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls)
        return [_spec(f, hints[f.name]) for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: dict | None = None) -> "MethodConfig":
        """A config from {name: value}, each value typed or as text; unknown names are an error."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UserError(f"method {cls.method!r} has no option {', '.join(map(repr, unknown))}; "
                            f"its options: {', '.join(known) or 'none'}")
        return cls(**options)

    @classmethod
    def ignored(cls, options: dict) -> dict[str, str]:
        """{option: why} for options that the configuration `options` describes ignores (subclasses)."""
        return {}

    @classmethod
    def from_stored(cls, options: dict | None) -> "MethodConfig":
        """A config as a file wrote it (adapter_config.json, a compare row): files hold every
        option, so those this configuration ignores are dropped rather than refused; a
        subclass whose defaults changed fills in the old ones where an older file is silent."""
        options = dict(options or {})
        return cls.from_options({k: v for k, v in options.items() if k not in cls.ignored(options)})

    def to_dict(self) -> dict:
        """The options as JSON values (what adapter_config.json stores)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _spec(f: dataclasses.Field, hint) -> OptionSpec:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    kind = args[0] if optional else hint
    item = length = None
    if typing.get_origin(kind) is tuple:
        item_args = typing.get_args(kind)
        item, length = item_args[0], (None if item_args[-1] is Ellipsis else len(item_args))
        kind = tuple
    return OptionSpec(f.name, kind, item, length, optional, f.default, f.metadata.get("help", ""),
                      f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max"))


def _coerce(method: str, spec: OptionSpec, value):
    """`value` (typed, or text from the command line) as the option's type, checked; else a UserError."""
    def fail(what: str):
        return UserError(f"method {method!r} option {spec.name!r} must be {what}, not {value!r}")

    if isinstance(value, str) and value.strip().lower() in ("none", "null", "") and spec.optional:
        return None
    if value is None:
        if spec.optional:
            return None
        raise fail(_describe(spec))
    if spec.kind is tuple:
        items = value.strip().strip("[]()").split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or (spec.length and len(items) != spec.length):
            raise fail(_describe(spec))
        item_spec = dataclasses.replace(spec, kind=spec.item, optional=False, choices=None)
        try:
            return tuple(_coerce(method, item_spec, v) for v in items)
        except UserError:
            raise fail(_describe(spec)) from None
    converted = _scalar(spec.kind, value)
    if converted is None or not _in_range(spec, converted):
        raise fail(_describe(spec))
    return converted


def _scalar(kind: type, value):
    """`value` as an int, float, bool or str, or None if it is not one."""
    if isinstance(value, str):
        text = value.strip()
        if kind is bool:
            return {"true": True, "false": False}.get(text.lower())
        if kind is str:
            return text
        try:
            value = float(text) if kind is float else int(text)
        except ValueError:
            return None
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is str or isinstance(value, bool):
        return value if kind is str and isinstance(value, str) else None
    if kind is int:
        return int(value) if isinstance(value, int) or (isinstance(value, float) and value.is_integer()) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _in_range(spec: OptionSpec, value) -> bool:
    if spec.choices is not None and value not in spec.choices:
        return False
    return (spec.min is None or value >= spec.min) and (spec.max is None or value <= spec.max)


def _describe(spec: OptionSpec) -> str:
    """What an option accepts, in words (for errors and help)."""
    if spec.kind is tuple:
        item = _describe(dataclasses.replace(spec, kind=spec.item, optional=False))
        words = f"{spec.length or 'several'} comma-separated values, each {item}"
    elif spec.choices is not None:
        words = " or ".join(repr(c) for c in spec.choices)
    else:
        words = {int: "an integer", float: "a finite number", bool: "true or false", str: "text"}[spec.kind]
        if spec.min is not None and spec.max is not None:
            words += f" in [{spec.min}, {spec.max}]"
        elif spec.min is not None:
            words += f" >= {spec.min}"
    return ("none, or " if spec.optional else "") + words


def option_text(value) -> str:
    """An option's value as it is typed on the command line: 16, 0.5, true, none, 64,32,8."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(option_text(v) for v in value)
    return str(value)


def describe(spec: OptionSpec) -> str:
    """One line of help for an option: what it is, what it accepts, its default."""
    return f"{spec.help} ({_describe(spec)}; default {option_text(spec.default)})"


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class Method:
    """Base class: subclasses set `name` and `Config`, and implement `attach`.

    A method owns what it adds to the model. `attach` freezes what the method does not
    train, registers new modules under the `DiffusionLM` (so `.to(device)` and `.train()`
    reach them) and adds its hooks through `self.hooks` (handles); `detach` undoes all of
    it. Methods that train some of the base's own tensors (BitFit's biases, Houlsby's
    LayerNorms) keep a copy of them and put it back; full fine-tuning keeps one only when
    asked (`keep_base`), since it is a second copy of the whole model.
    """

    name: ClassVar[str] = "method"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Merging folds the method into the base weights for inference; only methods that
    # change weights linearly (weight LoRA, DoRA) can do it.
    can_merge: ClassVar[bool] = False
    # Whether the method reads only the frozen base's last hidden states (nothing of it acts
    # inside the body): then a training run may cache those states (`train --cache-base`).
    reads_final_states_only: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.Config()
        self.model = None
        self.merged = False
        self.hooks: list = []  # removable handles of everything attach() hooked in
        self._requires_grad: dict[nn.Parameter, bool] = {}

    @property
    def default_lr(self) -> float:
        return self.config.default_lr()

    def attach(self, model) -> None:
        """Prepare `model` (a DiffusionLM) for training with this method."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove what `attach` added; the base computes exactly what it computed before."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        self._requires_grad = {}
        self.model = None

    def _remember_requires_grad(self, module: nn.Module) -> None:
        """Note every parameter's requires_grad before attach changes it (detach restores them)."""
        self._requires_grad = {p: p.requires_grad for p in module.parameters()}

    # Set by the training loop under DeepSpeed ZeRO-2 (see `zero`): a method whose modules act
    # on some rows only (LoRA-Diffusion's phases) then computes every module at each step.
    every_parameter_each_step: bool = False

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for everything the optimiser updates (tied weights once)."""
        raise NotImplementedError

    def buffers(self) -> dict[str, torch.Tensor]:
        """Non-trained tensors the adapter also needs (e.g. calibration statistics)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly what the method's adapter file holds: trainable parameters and buffers."""
        return {name: p.detach() for name, p in {**self.trainable_parameters(), **self.buffers()}.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = {**self.trainable_parameters(), **self.buffers()}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise UserError(f"adapter state does not fit method {self.name!r} with these options: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise UserError(f"adapter tensor {name} has shape {tuple(state[name].shape)}, "
                                f"the model expects {tuple(p.shape)} (another base or other options?)")
        with torch.no_grad():
            for name, p in params.items():
                assign(p, state[name].to(p.dtype))  # under FSDP: into this process's shard

    def regularization(self):
        """Extra loss term added to the diffusion loss at every step (None: nothing)."""
        return None

    def after_step(self, lr: float) -> None:
        """Called after every optimizer step with the step's learning rate (proximal updates)."""

    def merge(self) -> None:
        raise UserError(f"method {self.name!r} cannot be merged into the base")

    def unmerge(self) -> None:
        raise UserError(f"method {self.name!r} cannot be merged into the base")

    def options(self) -> dict:
        """The config as JSON values, stored in the adapter's JSON config."""
        return self.config.to_dict()

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    def formula(self) -> dict:
        """The method's own parameter formula, term by term (empty where it is just a sum)."""
        return {}

    def accounting(self) -> dict:
        """Trainable parameters, share of the base, and the bytes of the adapter file's tensors.

        `adapter_bytes` is what `save_adapter` writes: the file's size minus its header.
        """
        state = self.state_dict()
        n = self.n_trainable()
        base = self.model.base_parameters
        return {"trainable_parameters": n, "base_parameters": base,
                "percent_of_base": 100.0 * n / base,
                "adapter_parameters": sum(t.numel() for t in state.values()),
                "adapter_bytes": tensor_bytes(state), **self.formula()}


class BaseSnapshot:
    """A copy of some of the base's tensors, to put back on detach (methods that train the base's own)."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.saved = {name: p.detach().clone() for name, p in params.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.saved[name])
        self.saved = {}  # restored once; the copy is not kept
