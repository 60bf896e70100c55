"""What :func:`rdkv_hf.patch` leaves on a model instance, and the one place that reads it.

A patched model carries a :class:`PatchState`: the planner built once for its settings (every
:class:`~rdkv_hf.RDKVCache` made for the model uses it) and what :func:`rdkv_hf.unpatch` restores.
Modules that need it ask :func:`patch_state` instead of reading the attribute themselves. The state
holds no reference to the model, so ``copy.deepcopy`` of a patched model gives an independent,
patched copy.
"""

from __future__ import annotations

from dataclasses import dataclass

_ATTRIBUTE = "_rdkv_state"


@dataclass
class PatchState:
    """A patched model's planner and what to restore.

    Args:
        planner: the :class:`~rdkv_hf.planners.Planner` of the model's settings.
        profile: the :class:`~rdkv_hf.RDKVProfile` given to patch (None without one).
        attn_implementation: the attention implementation before the patch.
        own_generate: an instance-level ``generate`` that was there before the patch.
    """

    planner: object
    profile: object | None
    attn_implementation: str | None
    own_generate: object | None = None

    @property
    def config(self):
        return self.planner.config


def patch_state(model) -> PatchState | None:
    """The state :func:`rdkv_hf.patch` left on `model`, or None if it is not patched."""
    state = getattr(model, "__dict__", {}).get(_ATTRIBUTE)
    return state if isinstance(state, PatchState) else None


def set_patch_state(model, state: PatchState | None) -> None:
    if state is None:
        model.__dict__.pop(_ATTRIBUTE, None)
    else:
        model.__dict__[_ATTRIBUTE] = state
