"""Modes: one :class:`Planner` subclass per mode, found by name.

A mode decides how a cache spends its budget: which head gets how many bits, and how RDKV's
allocation (or an eviction rule) spends them on tokens and channels. Each planner validates its own
settings (budget range, profile needs) when it is built. A module of this package that defines a
subclass with a ``name`` registers that mode: adding a mode is adding one file here.

=================  ==========================================================================
``rdkv``           equal head budgets, RDKV spends each on V tokens then K channels
``rdkv+profile``   head budgets from a profile's measured curves, RDKV inside each head
``ratequant``      one width per head from a profile (RateQuant), nothing evicted
``uniform``        one width everywhere, nothing evicted
``snapkv``, ...    eviction baselines (kvpress's definitions) on the same packed cache
=================  ==========================================================================
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Planner, registered

_loaded = False


def _load_all() -> None:
    """Import every module of this package once, so that each mode is registered."""
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def modes() -> dict[str, type[Planner]]:
    """``{mode: Planner subclass}`` of every registered mode."""
    _load_all()
    return registered()


def planner_class(mode: str) -> type[Planner]:
    """The planner of `mode`; ``ValueError`` naming the valid modes otherwise."""
    found = modes().get(mode)
    if found is None:
        raise ValueError(f"`mode` must be one of {sorted(modes())}, got {mode!r}")
    return found


def make_planner(config, profile=None, layers=None, heads=None) -> Planner:
    """The planner of ``config.mode`` for a cache compressing `layers` (None: all) of the KV heads
    `heads` (``[start, stop)``, a tensor-parallel rank's; None: all)."""
    return planner_class(config.mode)(config, profile, layers, heads)


__all__ = ["Planner", "make_planner", "modes", "planner_class"]
