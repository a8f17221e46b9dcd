"""Models by reference: ``torchvision:NAME``, ``timm:NAME`` and ``pkg.module:factory``, each
with ``?k=v,...`` keyword arguments, built to the data's number of classes.

A reference is how a user names *their* model, and what a checkpoint records to rebuild it:
the reference, its arguments and the library's version (:func:`reference_spec`). Library
builders (torchvision, timm) are trusted code; a ``pkg.module:factory`` is the user's own,
so a reference read back from a file is imported only when the loader trusts it
(:func:`trusting`, which :func:`effray.train.checkpoint.load_checkpoint` sets from
``--trust-code``) or when the Python API handed this process the factory itself
(:func:`provide`). This module is the one place effray imports code by name.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import importlib
import inspect
import logging
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from effray.errors import EffrayError

log = logging.getLogger(__name__)

LIBRARIES = ("torchvision", "timm")
_MODULE_REF = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_<>][\w<>]*(\.[A-Za-z_<>][\w<>]*)*")
# factories the Python API handed this process (and its Ray workers): reference -> callable
_PROVIDED: dict[str, Callable[..., nn.Module]] = {}
# set while a file's recorded model is rebuilt: which pkg.module code it may import (True: any)
_FILE_TRUST: contextvars.ContextVar[bool | frozenset[str] | None] = contextvars.ContextVar("file_trust", default=None)


@dataclass(frozen=True)
class Reference:
    """A parsed ``--model``: ``kind`` is ``torchvision``, ``timm`` or ``module``."""

    kind: str
    name: str  # the builder's name, or "pkg.module:factory"
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The reference without its arguments (``torchvision:resnet18``)."""
        return self.name if self.kind == "module" else f"{self.kind}:{self.name}"

    @property
    def module(self) -> str:
        """The Python module a ``module`` reference imports ("" for library builders)."""
        return self.name.partition(":")[0] if self.kind == "module" else ""

    @property
    def library(self) -> str:
        return self.kind if self.kind in LIBRARIES else self.module.split(".")[0]


def is_reference(text: str) -> bool:
    """Whether ``--model`` names a model by reference rather than a built-in name."""
    return isinstance(text, str) and ":" in text


def parse_reference(text: str) -> Reference:
    """``timm:vit_tiny_patch16_224?img_size=64,drop_rate=0.1`` -> a :class:`Reference`;
    malformed text fails in one line showing the three forms."""
    base, _, query = str(text).partition("?")
    head, _, name = base.partition(":")
    forms = "torchvision:NAME, timm:NAME or pkg.module:factory, each with optional ?k=v,..."
    if head in LIBRARIES:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise EffrayError(f"--model {text!r}: no model name after {head}:; use {forms}")
        return Reference(head, name, parse_kwargs(query, text))
    if not _MODULE_REF.fullmatch(base):
        raise EffrayError(f"--model {text!r} is not a model reference; use {forms}")
    return Reference("module", base, parse_kwargs(query, text))


def parse_kwargs(query: str, text: str) -> dict[str, Any]:
    """``k=v,k2=v2`` -> keyword arguments; values are Python literals (numbers, True/False,
    None, quoted strings, tuples in brackets) or else plain strings."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in re.split(r",(?![^(\[]*[)\]])", query))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise EffrayError(f"--model {text!r}: argument {item!r} is not key=value")
        value = value.strip()
        lowered = {"true": True, "false": False, "none": None}
        try:
            out[key.strip()] = lowered[value.lower()] if value.lower() in lowered else ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def check_reference(text: str) -> None:
    """Validate a reference without building it or importing user code: the syntax, and that
    the library knows the name (a config's ``validate`` calls this)."""
    ref = parse_reference(text)
    if ref.kind == "torchvision":
        names = _torchvision_names()
        if ref.name not in names:
            near = ", ".join(n for n in names if n.startswith(ref.name[:4]))[:200] or ", ".join(names[:8]) + ", ..."
            raise EffrayError(f"--model {text!r}: torchvision has no classification model {ref.name!r}; e.g. {near}")
    elif ref.kind == "timm":
        timm = _timm()
        if not timm.is_model(ref.name):
            near = ", ".join(timm.list_models(f"{ref.name.split('_')[0]}*")[:8]) or "timm.list_models()"
            raise EffrayError(f"--model {text!r}: timm has no model {ref.name!r}; e.g. {near}")


def library_version(ref: Reference) -> str:
    """The installed version of the library that builds ``ref`` ("" when it has none)."""
    if ref.kind == "torchvision":
        import torchvision

        return str(torchvision.__version__)
    if ref.kind == "timm":
        return str(_timm().__version__)
    return ""


def provide(factory: Callable[..., nn.Module]) -> str:
    """Hand this process a model factory (the Python API's ``model=``): returns the reference
    a checkpoint records for it, and builds by that reference call it without any import."""
    if not callable(factory):
        raise EffrayError(f"a model factory must be callable, got {type(factory).__name__}")
    target = getattr(factory, "func", factory)  # functools.partial: name the function it wraps
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    ref = f"{module}:{qualname}"
    _PROVIDED[ref] = factory
    return ref


def provided() -> dict[str, Callable[..., nn.Module]]:
    """The factories handed to this process, to ship to Ray workers (see :func:`use_factories`)."""
    return dict(_PROVIDED)


def use_factories(factories: dict[str, Callable[..., nn.Module]]) -> None:
    """On a Ray worker: the driver's provided factories, so its references build here too."""
    _PROVIDED.update(factories or {})


@contextlib.contextmanager
def trusting(trust: bool | Collection[str]) -> Iterator[None]:
    """While a file's recorded model is rebuilt: ``pkg.module:factory`` references import only
    if ``trust`` is True or names their module (a module the user gave on this command line)."""
    token = _FILE_TRUST.set(True if trust is True else frozenset(trust or ()))
    try:
        yield
    finally:
        _FILE_TRUST.reset(token)


def trusted_modules(*texts: str) -> frozenset[str]:
    """The ``pkg.module`` of every module reference among ``texts`` (the command line's
    ``--model``/``--student``): code the user named, so files naming it may import it."""
    return frozenset(
        parse_reference(t).module for t in texts if is_reference(t) and parse_reference(t).kind == "module"
    )


def build_reference(ref: Reference, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The model ``ref`` names, its classifier sized to ``num_classes`` (built so by the
    library, or its last ``Linear`` replaced), in train mode, weights as the builder left them."""
    if ref.kind == "torchvision":
        model = _torchvision(ref, num_classes, in_channels)
    elif ref.kind == "timm":
        kwargs = {"in_chans": in_channels, **ref.kwargs, "num_classes": num_classes}
        model = _call(ref, lambda: _timm().create_model(ref.name, **kwargs))
    else:
        model = _from_factory(ref, num_classes, in_channels)
    return model.train()


def _torchvision(ref: Reference, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise EffrayError(
            f"--model {ref.text}: torchvision's builders take 3-channel images, the data has {in_channels}; "
            "use a timm: model (in_chans) or a factory of your own"
        )
    check_reference(ref.text)
    return _call(
        ref, lambda: torchvision.models.get_model(ref.name, weights=None, **ref.kwargs, num_classes=num_classes)
    )


def _from_factory(ref: Reference, num_classes: int, in_channels: int) -> nn.Module:
    factory = _PROVIDED.get(ref.name) or _import_factory(ref)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {
        k: v
        for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
        if (k in params or takes_any) and k not in ref.kwargs
    }
    model = _call(ref, lambda: factory(**ref.kwargs, **extra))
    if not isinstance(model, nn.Module):
        raise EffrayError(
            f"--model {ref.text}: the factory returned a {type(model).__name__}, not a torch.nn.Module; "
            "make it return the model"
        )
    return size_head(model, num_classes, ref.text)


def _import_factory(ref: Reference) -> Callable[..., nn.Module]:
    """The one place effray imports code by name: a ``pkg.module:factory`` the user gave on
    the command line, or one a file records and the loader trusts."""
    trust = _FILE_TRUST.get()
    if trust is not None and trust is not True and ref.module not in trust:
        raise EffrayError(
            f"this file's model is {ref.text}, code of your own that effray imports only when told to: pass "
            "--trust-code (or the Python API's model=your factory)"
        )
    module_name, _, attr = ref.name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise EffrayError(
            f"--model {ref.text}: can't import {module_name} ({exc}); put it on PYTHONPATH (on a cluster, "
            "ship it with the job's working_dir or py_modules)"
        ) from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise EffrayError(
                f"--model {ref.text}: {module_name} has no {attr!r}; name a function that returns the model"
            )
    if not callable(obj):
        raise EffrayError(f"--model {ref.text}: {attr} is a {type(obj).__name__}, not a function that builds a model")
    return obj


def _call(ref: Reference, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except EffrayError:
        raise
    except Exception as exc:  # noqa: BLE001 - a builder may raise anything; the user fixes the reference
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise EffrayError(
            f"--model {ref.text}{'?' if ref.kwargs else ''}{_kwargs_text(ref.kwargs)} failed to build "
            f"({type(exc).__name__}: {first}); fix its arguments"
        ) from None


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in kwargs.items())


def size_head(model: nn.Module, num_classes: int, text: str) -> nn.Module:
    """``model`` with its classifier (the last ``Linear``) giving ``num_classes`` outputs: a new
    layer of that size (PyTorch's init) when it gives another number; none is one line."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EffrayError(
            f"--model {text}: the model has no Linear classifier to size to {num_classes} classes; give the factory "
            "a num_classes argument or end the model with an nn.Linear"
        )
    name, head = linears[-1]
    if head.out_features != num_classes:
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.to(head.weight.device))
    return model


def reference_spec(text: str, num_classes: int, in_channels: int) -> dict[str, Any]:
    """What a checkpoint records to rebuild a referenced model: the reference without its
    arguments, the arguments, the library and its version."""
    ref = parse_reference(text)
    return {
        "name": ref.text,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "width": 1.0,
        "kwargs": dict(ref.kwargs),
        "library": ref.library,
        "version": library_version(ref),
    }


def reference_from_spec(spec: dict[str, Any]) -> Reference:
    """The :class:`Reference` a recorded spec names (its ``kwargs`` over any in the name);
    a library older or newer than the one that built it is a warning, not an error."""
    ref = parse_reference(spec["name"])
    ref = Reference(ref.kind, ref.name, {**ref.kwargs, **dict(spec.get("kwargs") or {})})
    recorded = spec.get("version") or ""
    if recorded and ref.kind in LIBRARIES:
        installed = library_version(ref)
        if installed != recorded:
            log.warning("%s was built with %s %s; %s is installed", ref.text, ref.kind, recorded, installed)
    return ref


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise EffrayError("timm: references need the timm package; pip install timm") from None
    return timm


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))
