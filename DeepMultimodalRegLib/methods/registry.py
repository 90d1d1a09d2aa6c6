"""The catalogue of registration methods behind ``deepmmreg register --method M``.

Every name of the command-line contract is listed here from the start, so the CLI, the Slicer
module and the demo can offer the same list.  A method module makes itself available by calling
:func:`register_method` with its runner; until then :func:`get_method` raises
:class:`NotAvailableError` naming what is missing.

A runner is called as ``runner(fixed, moving, options) -> RegistrationResult`` where ``options`` is
a :class:`RegistrationOptions`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import NotAvailableError
from ..progress import CancelToken, ProgressCallback


@dataclass
class RegistrationOptions:
    """Settings shared by every 3D registration method (method-specific ones go in ``extra``)."""

    search: str = "local"  # local | global
    device: str = "auto"
    seed: int = 0
    fixed_mask: Any = None  # Volume or None
    moving_mask: Any = None
    progress: Optional[ProgressCallback] = None
    cancel: Optional[CancelToken] = None
    extra: dict = field(default_factory=dict)


@dataclass
class MethodInfo:
    name: str
    family: str  # disa | mind | lc2 | msode | deep
    description: str
    #: module that registers the runner when imported (so the catalogue stays import-light)
    module: str
    runner: Optional[Callable] = None


def _entry(name: str, family: str, description: str, module: str) -> MethodInfo:
    return MethodInfo(name, family, description, module)


METHODS: dict[str, MethodInfo] = {m.name: m for m in [
    _entry("disa-rigid", "disa", "DISA-LC² descriptors, rigid (6 DOF)", "DeepMultimodalRegLib.disa"),
    _entry("disa-affine", "disa", "DISA-LC² descriptors, affine (12 DOF)", "DeepMultimodalRegLib.disa"),
    _entry("disa-deformable", "disa", "DISA-LC² descriptors, deformable", "DeepMultimodalRegLib.disa"),
    _entry("mind-rigid", "mind", "MIND-SSC descriptors with SSD, rigid", "DeepMultimodalRegLib.disa"),
    _entry("mind-affine", "mind", "MIND-SSC descriptors with SSD, affine", "DeepMultimodalRegLib.disa"),
    _entry("mind-deformable", "mind", "MIND-SSC descriptors with SSD, deformable", "DeepMultimodalRegLib.disa"),
    _entry("lc2-rigid", "lc2", "direct volume LC², derivative-free rigid", "DeepMultimodalRegLib.disa"),
    _entry("msode-rigid", "msode", "MS-ODE learned optimiser, rigid", "DeepMultimodalRegLib.msode"),
    _entry("msode-bspline", "msode", "MS-ODE learned optimiser, B-spline", "DeepMultimodalRegLib.msode"),
    _entry("msode-dense", "msode", "MS-ODE learned optimiser, dense field", "DeepMultimodalRegLib.msode"),
    _entry("msode-hybrid", "msode", "MS-ODE rigid then deformable", "DeepMultimodalRegLib.msode"),
    _entry("deep", "deep", "general deep deformable model (RSO paper), refinable with ISO/RSO",
           "DeepMultimodalRegLib.rso"),
]}


def register_method(name: str, runner: Callable) -> None:
    """Called by a method module at import time to make ``name`` available."""
    if name not in METHODS:
        raise ValueError(f"unknown method name {name!r}; add it to the catalogue first")
    METHODS[name].runner = runner


def _try_import(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module and not module.startswith(str(exc.name)):
            raise  # the module exists but one of its own imports is missing: a real error


def get_method(name: str) -> MethodInfo:
    """The method called ``name``, with its runner; a clear error if unknown or not available yet."""
    if name not in METHODS:
        raise NotAvailableError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    info = METHODS[name]
    if info.runner is None:
        _try_import(info.module)
    if info.runner is None:
        raise NotAvailableError(f"method {name!r} ({info.description}) is not available yet in this version")
    return info


def available_methods() -> list[str]:
    """Names of the methods that can run now."""
    names = []
    for name in METHODS:
        try:
            get_method(name)
        except NotAvailableError:
            continue
        names.append(name)
    return names
