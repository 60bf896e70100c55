"""RDKVProfile: what was measured on one model (the data, validated), saved and shared like a Hub
model repo (:mod:`rdkv_hf.profile_hub`), looked at as a table, a heat map or a model card
(:mod:`rdkv_hf.profile_card`). How head budgets are drawn from it is :mod:`rdkv_hf.head_budgets`.

Tensors, ``L`` layers, ``H`` KV heads, ``W`` calibration widths:

=====================  =========  ==================================================================
``sens_k``, ``sens_v``  ``[L, H]``  RateQuant sensitivity, mean ``||dLoss/dK_t||^2`` (resp. V)
``alpha_*``, ``beta_*``  ``[L, H]``  fit of the relative MSE ``D(b) = alpha * beta**(-b)``
``r2_*``                ``[L, H]``  R^2 of that fit (in log space)
``power_*``             ``[L, H]``  mean square of the head's K (resp. V): absolute MSE = power * D
``dist_*``              ``[L, H, W]`` measured relative MSE at the calibration widths
``eps_k``, ``eps_v``    ``[L, 3]``  RDKV epsilon tables at widths 2, 4, 8 per layer
``eps_*_global``        ``[3]``     their mean over layers
``weight_norms``        ``[L, 2]``  Frobenius norms of the K and V projection weights (a record; they identify nothing)
``rd_budgets``          ``[R]``     budgets (bits per element) of the RDKV curves
``rd_dist``             ``[L, H, R]`` mean squared attention-output error of RDKV at those budgets
``sens_o``              ``[L, H]``  mean squared loss gradient at the head group's attention output
=====================  =========  ==================================================================

The last three (see :mod:`rdkv_hf.calibration`) drive ``rdkv+profile``'s head budgets; profiles
saved before they existed lack them and fall back to RateQuant's curves.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import profile_card, profile_hub
from .config import DEFAULT_BUDGET
from .fingerprint import FINGERPRINT_KEYS, describe, fingerprint, same_shape, same_weights

logger = logging.getLogger(__name__)

EPS_WIDTHS = (2, 4, 8)
_PER_HEAD = ("sens_k", "sens_v", "alpha_k", "beta_k", "r2_k", "alpha_v", "beta_v", "r2_v", "power_k", "power_v")
_RD_CURVES = ("rd_budgets", "rd_dist", "sens_o")  # optional (profiles saved before them lack them)
_NOT_PER_LAYER = ("eps_k_global", "eps_v_global", "rd_budgets")


def layer_list(layers, n: int, where: str) -> list[int]:
    """`layers` checked as sorted, distinct indices of `n` layers (``None``: all of them)."""
    if layers is None:
        return list(range(n))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)):
        raise ValueError(f"{where}: `compressed_layers` must be a list of layer indices, got {layers!r}")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"{where}: `compressed_layers` holds {i!r}, not a layer index in [0, {n}): {list(layers)}")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"{where}: `compressed_layers` must be sorted with no repeats, got {list(layers)}")
    return list(layers)


@dataclass(eq=False)
class RDKVProfile:
    """Measured data of one model: RateQuant sensitivities and fits, RDKV epsilon tables.

    Build one with :func:`rdkv_hf.calibrate`, load one with :meth:`from_pretrained`, save it with
    :meth:`save_pretrained` or :meth:`push_to_hub`. Tensor shapes
    are in the module docstring (``[layers, kv_heads]`` for everything per head).
    ``compressed_layers``: the layers a cache compresses, sorted (``None``: all; Gemma 3: its
    full-attention layers, the sliding-window ones keep Transformers' cache); :meth:`show`,
    :meth:`plot` and the model card share the budget among them, as the cache does.

    The allocation weighs absolute errors: the K (or V) component of a head has sensitivity
    ``sens`` and distortion ``power * alpha * beta**(-b)`` (``alpha`` is fitted on relative MSE).
    """

    DEFAULT_QUANTIZER = {"name": "minmax-asym", "k_axis": "channel", "v_axis": "token", "meta_dtype": "float16"}
    EPS_WIDTHS = EPS_WIDTHS
    OPTIONAL_TENSORS = _RD_CURVES
    layer_list = staticmethod(layer_list)

    fingerprint: dict
    quantizer: dict
    calibration: dict
    sens_k: torch.Tensor
    sens_v: torch.Tensor
    alpha_k: torch.Tensor
    beta_k: torch.Tensor
    r2_k: torch.Tensor
    alpha_v: torch.Tensor
    beta_v: torch.Tensor
    r2_v: torch.Tensor
    power_k: torch.Tensor
    power_v: torch.Tensor
    dist_k: torch.Tensor
    dist_v: torch.Tensor
    eps_k: torch.Tensor
    eps_v: torch.Tensor
    eps_k_global: torch.Tensor
    eps_v_global: torch.Tensor
    weight_norms: torch.Tensor
    rd_budgets: torch.Tensor | None = None
    rd_dist: torch.Tensor | None = None
    sens_o: torch.Tensor | None = None
    compressed_layers: list[int] | None = None
    name_or_path: str | None = field(default=None, compare=False)

    def __post_init__(self):
        self._check(where="RDKVProfile")
        self.compressed_layers = layer_list(self.compressed_layers, self.num_layers, where="RDKVProfile")

    @property
    def num_layers(self) -> int:
        return int(self.fingerprint["num_layers"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.fingerprint["num_kv_heads"])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def _check(self, where: str) -> None:
        missing = [k for k in FINGERPRINT_KEYS if k not in self.fingerprint]
        if missing:
            raise ValueError(f"{where}: the fingerprint lacks {missing}; re-save or re-calibrate the profile")
        L, H = self.num_layers, self.num_kv_heads
        W = len(self.calibration.get("widths", []))
        expected = {name: (L, H) for name in _PER_HEAD}
        expected.update(dist_k=(L, H, W), dist_v=(L, H, W), eps_k=(L, 3), eps_v=(L, 3), eps_k_global=(3,), eps_v_global=(3,), weight_norms=(L, 2))
        for name, shape in expected.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: `{name}` must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: `{name}` has shape {tuple(t.shape)}, expected {shape} for {L} layers x {H} KV heads")
            if not torch.isfinite(t).all():
                raise ValueError(f"{where}: `{name}` holds non-finite values")
        for name in ("alpha_k", "alpha_v", "power_k", "power_v"):
            if (getattr(self, name) <= 0).any():
                raise ValueError(f"{where}: `{name}` must be > 0 everywhere")
        for name in ("sens_k", "sens_v"):
            if (getattr(self, name) < 0).any():
                raise ValueError(f"{where}: `{name}` must be >= 0 everywhere")
        rd = [getattr(self, n) for n in _RD_CURVES]
        if any(t is not None for t in rd):
            if any(t is None for t in rd):
                raise ValueError(f"{where}: give all of {_RD_CURVES} or none of them")
            R = self.rd_budgets.numel()
            for name, shape in zip(_RD_CURVES, ((R,), (L, H, R), (L, H))):
                t = getattr(self, name)
                if tuple(t.shape) != shape:
                    raise ValueError(f"{where}: `{name}` has shape {tuple(t.shape)}, expected {shape}")
                if not torch.isfinite(t).all() or (t < 0).any():
                    raise ValueError(f"{where}: `{name}` must be finite and >= 0")
            if R < 2 or (self.rd_budgets.diff() <= 0).any() or self.rd_budgets[0] <= 0:
                raise ValueError(f"{where}: `rd_budgets` must be at least 2 increasing positive budgets, got {self.rd_budgets.tolist()}")

    def select_layers(self, layers) -> RDKVProfile:
        """The profile of only `layers` (e.g. the full-attention layers a cache compresses): every
        per-layer tensor indexed by them, ``fingerprint["num_layers"]`` set to their number, and
        ``compressed_layers`` the new indices of those of `layers` that were compressed."""
        layers = [int(i) for i in layers]
        index = torch.as_tensor(layers, dtype=torch.long, device="cpu")
        per_layer = {name: t.index_select(0, index) for name, t in self.tensors().items() if name not in _NOT_PER_LAYER}
        compressed = set(self.compressed_layers)
        return dataclasses.replace(
            self, fingerprint={**self.fingerprint, "num_layers": len(index)},
            compressed_layers=[j for j, i in enumerate(layers) if i in compressed], **per_layer,
        )

    @property
    def has_rd_curves(self) -> bool:
        return self.rd_dist is not None

    def eps_tables(self, layer: int | None = None) -> tuple[dict, dict]:
        """RDKV distortion tables ``(eps_k, eps_v)`` as :class:`~rdkv_hf.RDKVConfig` takes them.

        Args:
            layer: a layer index for its own tables, ``None`` for the mean over layers.
        Returns:
            two dicts ``{0: 1.0, 2: ., 4: ., 8: ., 16: 0.0}``, non-increasing in the width.
        """
        if layer is None:
            ek, ev = self.eps_k_global, self.eps_v_global
        else:
            if isinstance(layer, bool) or not isinstance(layer, int) or not -self.num_layers <= layer < self.num_layers:
                raise ValueError(f"`layer` must be an int in [0, {self.num_layers}) or None, got {layer!r}")
            ek, ev = self.eps_k[layer], self.eps_v[layer]

        def table(e: torch.Tensor) -> dict:
            vals = e.double().clamp(0.0, 1.0).cummin(0).values.tolist()  # keep it non-increasing
            return {0: 1.0, **{b: float(x) for b, x in zip(EPS_WIDTHS, vals)}, 16: 0.0}

        return table(ek), table(ev)

    def check_model(self, model) -> None:
        """Raise ``ValueError`` unless this profile was measured on `model`.

        Architecture and shapes must match, and the hash of the model's K/V projection weights must
        equal the profile's at a precision both recorded (:func:`rdkv_hf.fingerprint.same_weights`:
        bfloat16 for float32 and bfloat16 loads, float16 for float32 and float16 loads). The weights
        are read whole wherever they are (tensor-parallel shards, offloaded layers): under tensor
        parallelism every rank must call this.
        """
        theirs = fingerprint(model)
        ours = self.fingerprint
        if same_shape(ours, theirs) and same_weights(ours, theirs):
            return
        hint = ""
        if same_shape(ours, theirs) and ours.get("weights_sha256_fp16") is None and _weights_dtype(model) == torch.float16:
            hint = (" (the model is float16: its weights round differently from the bfloat16 this profile's only hash "
                    "was taken at; load the model in float32 or bfloat16, or re-calibrate to record a float16 hash)")
        raise ValueError(
            f"profile {self.name_or_path or '<in memory>'} does not match this model: the profile was "
            f"measured on [{describe(ours)}], the model is [{describe(theirs)}]{hint}; calibrate this model "
            "with rdkv_hf.calibrate(model, tokenizer=tokenizer) or load the profile made for it"
        )

    # -- files and the Hub (rdkv_hf.profile_hub) -------------------------------------------------

    def save_pretrained(self, save_directory, *, repo_id: str | None = None) -> Path:
        """Write ``config.json``, ``profile.safetensors`` and ``README.md`` into `save_directory`
        (`repo_id`: the Hub id in the model card's usage snippet, default the folder name)."""
        return profile_hub.save(self, save_directory, repo_id)

    @classmethod
    def from_pretrained(cls, repo_id_or_dir, revision: str | None = None, cache_dir=None, local_files_only: bool = False,
                        token: str | bool | None = None) -> RDKVProfile:
        """Load a profile from a directory, a shipped profile name or a Hub repo (in that order)."""
        return profile_hub.load(cls, repo_id_or_dir, revision, cache_dir, local_files_only, token)

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False, commit_message: str = "Upload RDKV profile"):
        """Create (or reuse) the Hub model repo `repo_id` and upload this profile to it."""
        return profile_hub.push(self, repo_id, token, private, commit_message)

    # -- looking at it (rdkv_hf.profile_card) ----------------------------------------------------

    def show(self, budget: float = DEFAULT_BUDGET, *, integer: bool = True, bounds: tuple | None = None, layers=None) -> str:
        """A table of the bits of every layer and KV head at `budget` (:func:`rdkv_hf.profile_card.show`)."""
        return profile_card.show(self, budget, integer=integer, bounds=bounds, layers=layers)

    def plot(self, budget: float, path, *, integer: bool = True, bounds: tuple | None = None, layers=None) -> Path:
        """A PNG heat map of the K and V bits at `budget` (:func:`rdkv_hf.profile_card.plot`)."""
        return profile_card.plot(self, budget, path, integer=integer, bounds=bounds, layers=layers)


def _weights_dtype(model) -> torch.dtype | None:
    """The dtype of the model's first K projection weight."""
    from .weights import kv_projections

    return kv_projections(model)[0][0].weight.dtype
