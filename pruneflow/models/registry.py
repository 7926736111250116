"""Model registry: name -> factory, plus ``package.module:factory`` user models.

Registry factories have the signature ``factory(in_channels, num_classes, **kwargs)``.
User factories named as ``"package.module:factory"`` are imported and called with the
keyword arguments only (``in_channels`` / ``num_classes`` apply to registry models).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}

_USER_FORM_HELP = (
    "To use your own model, pass an import path of the form 'package.module:factory' "
    "(e.g. 'my_project.models:build_net'); the module is imported and factory(**kwargs) is called, "
    "and it must return a torch.nn.Module."
)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(in_channels, num_classes, **kwargs)`` under ``name``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if ":" in name:
        raise ValueError(f"model name {name!r} must not contain ':' (reserved for 'package.module:factory')")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if not callable(factory):
            raise TypeError(
                f"register_model({name!r}) must decorate a callable, got {type(factory).__name__}"
            )
        existing = _REGISTRY.get(name)
        if existing is not None and _describe(existing) != _describe(factory):  # same name = module reload
            raise ValueError(f"model name {name!r} is already registered (by {_describe(existing)})")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def build_model(name: str, in_channels: int, num_classes: int, /, **kwargs: Any) -> nn.Module:
    """Build a registered model, or a user model given as ``"package.module:factory"``.

    Raises:
        ValueError: unknown registry name, malformed import path, import failure or missing attribute,
            non-positive ``in_channels``/``num_classes`` for a registry model.
        TypeError: unknown keyword argument for a registry model, a non-callable user factory,
            or a factory that does not return a ``torch.nn.Module``.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    if ":" in name:
        factory = _import_factory(name)
        model = factory(**kwargs)
        return _check_module(model, name)

    factory = _REGISTRY.get(name)
    if factory is None:
        available = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}. Available models: {available}. {_USER_FORM_HELP}")
    for arg_name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model {name!r}: {arg_name} must be a positive int, got {value!r}")
    _check_kwargs(name, factory, kwargs)
    model = factory(in_channels, num_classes, **kwargs)
    return _check_module(model, name)


def _check_kwargs(name: str, factory: ModelFactory, kwargs: dict[str, Any]) -> None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins / C callables: let the call itself complain
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        p.name
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in ("in_channels", "num_classes")
    ]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        accepted_txt = ", ".join(accepted) if accepted else "none"
        raise TypeError(
            f"model {name!r} got unexpected keyword argument(s): {', '.join(repr(k) for k in unknown)}; "
            f"accepted keyword arguments: {accepted_txt}"
        )


def _import_factory(spec: str) -> ModelFactory:
    module_path, _, attr_path = spec.partition(":")
    if not module_path or not attr_path or ":" in attr_path:
        raise ValueError(f"malformed model import path {spec!r}. {_USER_FORM_HELP}")
    try:
        module = importlib.import_module(module_path)
    except Exception as exc:  # any error raised while importing user code
        raise ValueError(
            f"cannot import module {module_path!r} for model {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ValueError(
                f"cannot load model {spec!r}: module {module_path!r} has no attribute {attr_path!r} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    if not callable(obj):
        raise TypeError(f"model factory {spec!r} is not callable (got {type(obj).__name__})")
    return obj


def _check_module(model: Any, name: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model factory for {name!r} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def _describe(factory: ModelFactory) -> str:
    module = getattr(factory, "__module__", "?")
    qualname = getattr(factory, "__qualname__", repr(factory))
    return f"{module}.{qualname}"
