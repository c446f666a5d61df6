"""Fine-tuning methods behind one small interface.

A method attaches to a `DiffusionLM` (freezing what it does not train, adding its own
modules or a step hook), names its trainable parameters, and saves / loads exactly
the state its adapter file holds. The training loop, the evaluator and the CLI only
see this interface, so a new method is one new module registered in `METHODS`.
"""

from __future__ import annotations

from .base import Method
from .full import FullFineTune

METHODS: dict[str, type[Method]] = {
    FullFineTune.name: FullFineTune,
}


def make_method(name: str, **options) -> Method:
    from ..errors import UserError

    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from: {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)


__all__ = ["Method", "METHODS", "make_method", "FullFineTune"]
