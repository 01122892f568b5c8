"""Seed methods by name: ``get_method('gradcam', model, params)`` -> a :class:`CAMMethod`.

Every method declared in :mod:`wsss.methods` maps to a factory ``(model, params) -> CAMMethod``
built from its ``cam`` entry (``module:Class`` under ``wsss.cams``, imported on first use). A
method with its own training stage (ReCAM, Puzzle-CAM, SIPE) differs from plain CAM in the
checkpoint it is given; at inference:

=================  ====================================================================
cam                :class:`~wsss.cams.cam.CAM` (Zhou et al. 2016)
gradcam            :class:`~wsss.cams.gradcam.GradCAM` (Selvaraju et al. 2017)
gradcampp          :class:`~wsss.cams.gradcampp.GradCAMPlusPlus` (Chattopadhay et al. 2018)
scorecam           :class:`~wsss.cams.scorecam.ScoreCAM` (Wang et al. 2020)
recam              :class:`~wsss.cams.cam.ReCAM`: CAM with re-activated weights (Chen et al. 2022)
recam-scorecam     ReCAM as well; its training uses Score-CAMs instead of CAMs as masks
puzzlecam          plain CAM of the Puzzle-CAM-trained classifier (Jo & Yu 2021)
sipe               ``wsss.cams.sipe.ISCAM`` (Chen et al. 2022)
=================  ====================================================================

Other modules add methods at run time with :func:`register_method` (not in the pipeline).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from .. import methods as declared
from ..config import Params
from ..errors import UserError
from .base import CAMMethod

Factory = Callable[[nn.Module, Params], CAMMethod]

#: Every declared method name as a str Enum (``Method.RECAM_SCORECAM.value == "recam-scorecam"``).
Method = declared.enum("Method")
Method.__str__ = lambda self: self.value


def _lazy(module: str, attr: str, method: str) -> Factory:
    """A factory that imports ``wsss.cams.<module>.<attr>`` when first called."""

    def factory(model: nn.Module, params: Params) -> CAMMethod:
        full = f"{__package__}.{module}"
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:  # a dependency of the module is missing: a real bug, show it
                raise
            raise UserError(f"method '{method}' is not available: module {full} is missing from this "
                            f"installation; choose another method in params.yaml key 'methods'") from None
        cls = getattr(mod, attr, None)
        if cls is None:
            raise UserError(f"method '{method}' is not available: {full} defines no {attr}")
        return cls(model, params)

    return factory


_REGISTRY: dict[str, Factory] = {m.name: _lazy(*m.cam.split(":"), m.name) for m in declared.METHODS}


def register_method(name: str, factory: Factory) -> None:
    """Add (or replace) the method ``name``; ``factory(model, params)`` returns a CAMMethod."""
    _REGISTRY[str(name)] = factory


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str | Method, model: nn.Module, params: Params | None = None) -> CAMMethod:
    """The CAM method ``name`` for ``model``; unknown names raise :class:`UserError`."""
    key = name.value if isinstance(name, Method) else str(name)
    factory = _REGISTRY.get(key)
    if factory is None:
        raise UserError(f"unknown CAM method {key!r}; choose from {', '.join(_REGISTRY)}")
    return factory(model, params if params is not None else Params())
