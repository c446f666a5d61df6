"""Fine-tuning methods behind one small interface, each built from its config dataclass.

A method attaches to a `DiffusionLM` (freezing what it does not train, adding its own
modules or hooks) and detaches again, names its trainable parameters, and saves / loads
exactly the state its adapter file holds. The training loop, the evaluator, the CLI and
the app only see this interface, so a new method is one new module registered here.
"""

from __future__ import annotations

from ..errors import UserError
from .base import Method, MethodConfig, OptionSpec, describe, option_text
from .bitfit import BitFit
from .full import FullFineTune
from .houlsby import Houlsby
from .lora_diffusion import LoRADiffusion
from .prefix import PrefixTuning
from .step_lora import NaRA, TLoRA
from .weight_lora import DoRA, WeightLoRA

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    FullFineTune, LoRADiffusion, WeightLoRA, DoRA, NaRA, TLoRA, Houlsby, BitFit, PrefixTuning)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, options: dict | None = None) -> MethodConfig:
    """The validated config of method `name` from {option: value} (values typed or as text)."""
    return method_class(name).Config.from_options(options)


def stored_config(name: str, options: dict | None) -> MethodConfig:
    """The config of method `name` as a file stored it (see MethodConfig.from_stored)."""
    return method_class(name).Config.from_stored(options)


def typed_options(name: str, options: dict | None) -> dict:
    """Just the options given, checked and typed by the method's config (JSON values: true, not "true")."""
    values = method_config(name, options).to_dict()
    return {key: values[key] for key in options or {}}


def make_method(name: str, options: dict | None = None) -> Method:
    """A method ready to attach, from its name and options (see `method_config`)."""
    return method_class(name)(method_config(name, options))


def stored_method(name: str, options: dict | None) -> Method:
    """A method from the options a file stored (see MethodConfig.from_stored)."""
    return method_class(name)(stored_config(name, options))


def option_specs(name: str) -> list[OptionSpec]:
    """The options of method `name`, with their types, defaults, help and allowed values."""
    return method_class(name).Config.specs()


def parse_option_pairs(pairs: list[str] | None) -> dict[str, str]:
    """['r=8', 'ranks=16,16,16'] -> {'r': '8', 'ranks': '16,16,16'}: text for the config to read."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option wants KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


__all__ = ["Method", "MethodConfig", "METHODS", "make_method", "method_config", "method_class", "option_specs",
           "typed_options",
           "parse_option_pairs", "describe", "option_text", "FullFineTune", "LoRADiffusion", "WeightLoRA", "DoRA", "Houlsby",
           "BitFit", "PrefixTuning", "NaRA", "TLoRA"]
