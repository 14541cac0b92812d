"""Technique handlers, looked up by the type of the choice they apply (STYLE.md principle 6).

A handler is `handler(module, choice, ctx) -> module`: it returns the module that replaces `module`
(or `module` itself, changed in place). Handlers register with a decorator next to their code:

    @register(QuantFormat)
    def quantize(module, choice, ctx): ...

and `apply` finds them with `handler_for(choice)`. A choice whose type has no handler is a bug in
lwdsl, not a silent no-op: it fails loudly with E601.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lwdsl.errors import fail


@dataclass(frozen=True)
class ApplyContext:
    """What a handler may need besides the module and the choice.

    `name` is the module's full name ("model.layers.3.mlp.down_proj"); `calibration` holds sample
    inputs of this module (rows of activations, `[tokens, in_features]`) when the plan has
    calibration text; `options` carries handler-specific settings (e.g. {"kernel": "int8pack_bf16"}).
    """

    name: str = ""
    calibration: Any = None  # torch.Tensor | None; typed loosely so this module imports no torch
    options: dict = field(default_factory=dict)


Handler = Callable[[Any, Any, ApplyContext], Any]

_HANDLERS: dict[type, Handler] = {}


def register(choice_type: type) -> Callable[[Handler], Handler]:
    """Decorator: make `handler` the one that applies choices of `choice_type`."""

    def decorate(handler: Handler) -> Handler:
        existing = _HANDLERS.get(choice_type)
        if existing is not None and existing is not handler:
            raise RuntimeError(f"two handlers for {choice_type.__name__}: "
                               f"{existing.__module__}.{existing.__name__} and "
                               f"{handler.__module__}.{handler.__name__}")
        _HANDLERS[choice_type] = handler
        return handler

    return decorate


def handler_for(choice: Any) -> Handler:
    """The handler registered for `type(choice)`; E601 when there is none."""
    handler = _HANDLERS.get(type(choice))
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in _HANDLERS)) or "none"
        raise fail("E601", f"no handler applies a {type(choice).__name__} choice",
                   hint=f"registered handlers: {known}; import the module that registers it")
    return handler


def apply_choice(module: Any, choice: Any, ctx: ApplyContext) -> Any:
    """Look the handler up and run it: `module, choice -> module`."""
    return handler_for(choice)(module, choice, ctx)


def registered() -> tuple[type, ...]:
    return tuple(_HANDLERS)
