"""Fine-tuning methods behind one small interface.

A method attaches to a `DiffusionLM` (freezing what it does not train, adding its own
modules or a step hook), names its trainable parameters, and saves / loads exactly
the state its adapter file holds. The training loop, the evaluator and the CLI only
see this interface, so a new method is one new module registered in `METHODS`.
"""

from __future__ import annotations

import inspect

from ..errors import UserError
from .adapters import HoulsbyAdapters
from .base import Method
from .bitfit import BitFit
from .full import FullFineTune
from .prefix import PrefixTuning
from .trajectory import LoRADiffusion
from .weight_lora import DoRA, WeightLoRA

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    FullFineTune, LoRADiffusion, WeightLoRA, DoRA, HoulsbyAdapters, BitFit, PrefixTuning)}


def method_options(name: str) -> dict:
    """Option name -> default value of a method."""
    params = inspect.signature(METHODS[name].__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def make_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    known = method_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
                        f"its options: {', '.join(known) or 'none'}")
    return METHODS[name](**options)


__all__ = ["Method", "METHODS", "make_method", "method_options", "FullFineTune", "LoRADiffusion", "WeightLoRA", "DoRA",
           "HoulsbyAdapters", "BitFit", "PrefixTuning"]
