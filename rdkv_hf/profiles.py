"""RDKVProfile: what was measured on one model, saved and shared like a Hub model repo.

A profile directory (or Hub repo) holds three files:

- ``config.json``: schema version, the model fingerprint, the quantizer, the calibration setup and
  ``compressed_layers``, the layers a cache compresses (absent in older profiles: all layers);
- ``profile.safetensors``: the measured tensors (below); nothing is ever unpickled;
- ``README.md``: a generated model card.

Tensors, ``L`` layers, ``H`` KV heads, ``W`` calibration widths:

=====================  =========  ==================================================================
``sens_k``, ``sens_v``  ``[L, H]``  RateQuant sensitivity, mean ``||dLoss/dK_t||^2`` (resp. V)
``alpha_*``, ``beta_*``  ``[L, H]``  fit of the relative MSE ``D(b) = alpha * beta**(-b)``
``r2_*``                ``[L, H]``  R^2 of that fit (in log space)
``power_*``             ``[L, H]``  mean square of the head's K (resp. V): absolute MSE = power * D
``dist_*``              ``[L, H, W]`` measured relative MSE at the calibration widths
``eps_k``, ``eps_v``    ``[L, 3]``  RDKV epsilon tables at widths 2, 4, 8 per layer
``eps_*_global``        ``[3]``     their mean over layers
``weight_norms``        ``[L, 2]``  Frobenius norms of the K and V projection weights
``rd_budgets``          ``[R]``     budgets (bits per element) of the RDKV curves
``rd_dist``             ``[L, H, R]`` mean squared attention-output error of RDKV at those budgets
``sens_o``              ``[L, H]``  mean squared loss gradient at the head group's attention output
=====================  =========  ==================================================================

The last three (see :mod:`rdkv_hf.calibrate`) drive ``rdkv+profile``'s head budgets; profiles
saved before they existed lack them and fall back to RateQuant's curves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .head_budgets import allocate_heads, default_bounds
from .planner import _on_layers

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "profile.safetensors"
CARD_NAME = "README.md"
EPS_WIDTHS = (2, 4, 8)
SHIPPED_DIR = Path(__file__).parent / "profiles"
_PER_HEAD = ("sens_k", "sens_v", "alpha_k", "beta_k", "r2_k", "alpha_v", "beta_v", "r2_v", "power_k", "power_v")
_RD_CURVES = ("rd_budgets", "rd_dist", "sens_o")  # optional (profiles saved before them lack them)
_NOT_PER_LAYER = ("eps_k_global", "eps_v_global", "rd_budgets")
_FINGERPRINT_KEYS = ("model_type", "architecture", "num_layers", "num_kv_heads", "head_dim", "weights_sha256")


# ---------------------------------------------------------------------------------------------
# Model fingerprint


def kv_projections(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """``[(k_proj, v_proj)]`` of every decoder layer (``model.model.layers[i].self_attn``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "k_proj") or not hasattr(attn, "v_proj"):
            raise ValueError(f"layer {i} of {type(model).__name__} has no self_attn.k_proj / v_proj; this architecture is not supported")
        out.append((attn.k_proj, attn.v_proj))
    return out


def fingerprint(model) -> dict:
    """Identity of a model for a profile: architecture, shapes and a hash of its K/V projections.

    The hash is the first 16 hex chars of a sha256 over the K and V projection weights (and biases)
    of every layer, rounded to bfloat16, so a float32 and a bfloat16 load of the same checkpoint agree.
    """
    cfg = model.config
    n_heads = cfg.num_attention_heads
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    h = hashlib.sha256()
    for k_proj, v_proj in kv_projections(model):
        for module in (k_proj, v_proj):
            for name in ("weight", "bias"):
                t = getattr(module, name, None)
                if t is None:
                    continue
                t = t.detach().to("cpu", torch.bfloat16).contiguous()
                h.update(f"{name}{tuple(t.shape)}".encode())
                h.update(t.view(torch.int16).numpy().tobytes())
    return {
        "model_type": cfg.model_type,
        "architecture": archs[0],
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads),
        "weights_sha256": h.hexdigest()[:16],
    }


def weight_norms(model) -> torch.Tensor:
    """``[layers, 2]`` Frobenius norms of each layer's K and V projection weights (float64 sums)."""
    return torch.tensor(
        [[m.weight.detach().double().norm().item() for m in pair] for pair in kv_projections(model)],
        dtype=torch.float32, device="cpu",
    )


def _describe(fp: dict) -> str:
    return ", ".join(f"{k}={fp.get(k)}" for k in _FINGERPRINT_KEYS)


# ---------------------------------------------------------------------------------------------
# The profile


@dataclass(eq=False)
class RDKVProfile:
    """Measured data of one model: RateQuant sensitivities and fits, RDKV epsilon tables.

    Build one with :func:`rdkv_hf.calibrate`, load one with :meth:`from_pretrained`. Tensor shapes
    are in the module docstring (``[layers, kv_heads]`` for everything per head).
    ``compressed_layers``: the layers a cache compresses, sorted (``None``: all; Gemma 3: its
    full-attention layers, the sliding-window ones keep Transformers' cache); :meth:`show`,
    :meth:`plot` and the model card share the budget among them, as the cache does.

    The allocation weighs absolute errors: the K (or V) component of a head has sensitivity
    ``sens`` and distortion ``power * alpha * beta**(-b)`` (``alpha`` is fitted on relative MSE).
    """

    DEFAULT_QUANTIZER = {"name": "minmax-asym", "k_axis": "channel", "v_axis": "token", "meta_dtype": "float16"}

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
        self.compressed_layers = _layer_list(self.compressed_layers, self.num_layers, where="RDKVProfile")

    # -- shapes ---------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return int(self.fingerprint["num_layers"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.fingerprint["num_kv_heads"])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def _check(self, where: str) -> None:
        missing = [k for k in _FINGERPRINT_KEYS if k not in self.fingerprint]
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

    def select_layers(self, layers) -> "RDKVProfile":
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

    # -- what the cache needs -------------------------------------------------------------------

    def head_bits(self, budget: float, *, integer: bool = True, bounds: tuple | None = None):
        """RateQuant widths of every KV head's K and V for a mean of `budget` code bits per element.

        The ``2 * layers * kv_heads`` components share ``round(budget * 2N)`` bits (greedy, integer)
        or a real mean of exactly `budget` (closed form). Scales and minima are not counted.

        Args:
            budget: mean code bits per element, 1..8.
            integer: greedy integers, else closed-form reals.
            bounds: ``(b_min, b_max)``; default RateQuant's table (2.5 -> [2, 4], 3 -> [2, 5], 3.5 -> [3, 6]).
        Returns:
            ``(k_bits, v_bits)``, each ``[layers, kv_heads]`` (LongTensor, or float64 if not `integer`).
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"`budget` must be a number of bits, got {type(budget).__name__}")
        if not 1 <= budget <= 8:
            raise ValueError(f"`budget` must be in [1, 8] code bits per element for per-head widths, got {budget}")
        if bounds is not None:
            b_min, b_max = bounds
            if not b_min <= budget <= b_max:
                raise ValueError(f"`budget`={budget} is outside `bounds`=({b_min}, {b_max}); widen the bounds")
        return allocate_heads(
            self.sens_k, self.alpha_k.double() * self.power_k.double(), self.beta_k, self.r2_k,
            self.sens_v, self.alpha_v.double() * self.power_v.double(), self.beta_v, self.r2_v,
            float(budget), integer=integer, bounds=bounds,
        )

    @property
    def has_rd_curves(self) -> bool:
        return self.rd_dist is not None

    def rd_head_bits(self, budget: float) -> torch.Tensor:
        """Budget of every KV head (K and V together) for RDKV inside it, mean exactly `budget`.

        Minimizes ``sum sens_o * rd_dist(b)`` over the heads, ``rd_dist`` linear between the measured
        budgets: each head's curve is replaced by its lower convex hull, and bits go to the hull
        segments with the largest loss decrease per bit first (the last one partly).

        Returns:
            ``[layers, kv_heads]`` float64 budgets in ``[rd_budgets[0], rd_budgets[-1]]``.
        """
        if not self.has_rd_curves:
            raise ValueError("this profile has no RDKV curves (saved before they existed); re-calibrate it with rdkv_hf.calibrate")
        grid = self.rd_budgets.double().tolist()
        lo, hi = grid[0], grid[-1]
        if not lo <= budget <= hi:
            raise ValueError(f"`budget` must be in [{lo:g}, {hi:g}] bits for the profile's RDKV curves, got {budget}")
        cost = (self.sens_o.double()[..., None] * self.rd_dist.double()).reshape(-1, len(grid))
        bits = torch.full((cost.shape[0],), lo, dtype=torch.float64, device="cpu")
        segments = []  # (decrease per bit, head, width in bits)
        for h, row in enumerate(cost.tolist()):
            for (b0, c0), (b1, c1) in _lower_hull(list(zip(grid, row))):
                segments.append(((c0 - c1) / (b1 - b0), h, b1 - b0))
        left = (budget - lo) * cost.shape[0]
        # Segments of equal slope (equal heads) share what is left in proportion to their widths.
        for _, group in itertools.groupby(sorted(segments, key=lambda t: -t[0]), key=lambda t: t[0]):
            if left <= 0:
                break
            group = list(group)
            share = min(1.0, left / sum(w for _, _, w in group))
            for _, h, width in group:
                bits[h] += width * share
            left -= share * sum(w for _, _, w in group)
        if left > 1e-12:  # every curve flat before `hi`: spread the rest over the room left
            room = hi - bits
            bits += room * (left / room.sum())
        return bits.reshape(self.sens_o.shape)

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

    def check_model(self, model, *, rtol: float = 1e-3) -> None:
        """Raise ``ValueError`` unless this profile was measured on `model`.

        Shapes and architecture must match. The weight hash must match too, or, when it does not
        (a float16 load of a float32 checkpoint rounds differently), every K/V projection norm must be
        within `rtol` of the profile's.
        """
        theirs = fingerprint(model)
        ours = self.fingerprint
        same_shape = all(str(ours.get(k)) == str(theirs.get(k)) for k in _FINGERPRINT_KEYS[:-1])
        if same_shape and ours["weights_sha256"] == theirs["weights_sha256"]:
            return
        if same_shape:
            norms = weight_norms(model)
            rel = ((norms - self.weight_norms).abs() / self.weight_norms.clamp(min=1e-12)).max().item()
            if rel <= rtol:
                logger.info("profile weights hash differs but K/V norms agree within %.1e: same weights, other precision", rel)
                return
        raise ValueError(
            f"profile {self.name_or_path or '<in memory>'} does not match this model: the profile was "
            f"measured on [{_describe(ours)}], the model is [{_describe(theirs)}]; calibrate this model "
            "with rdkv_hf.calibrate(model, tokenizer=tokenizer) or load the profile made for it"
        )

    # -- saving and loading ---------------------------------------------------------------------

    def save_pretrained(self, save_directory, *, repo_id: str | None = None) -> Path:
        """Write ``config.json``, ``profile.safetensors`` and ``README.md`` into `save_directory`.

        Args:
            repo_id: the Hub id shown in the model card's usage snippet (default: the folder name).
        Returns:
            the directory.
        """
        from safetensors.torch import save_file

        from . import __version__

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.tensors().items()}
        config = {
            "schema_version": SCHEMA_VERSION,
            "library_name": "rdkv_hf",
            "created_with": f"rdkv_hf {__version__}",
            "fingerprint": self.fingerprint,
            "quantizer": self.quantizer,
            "calibration": self.calibration,
            "compressed_layers": self.compressed_layers,
            "eps_widths": list(EPS_WIDTHS),
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "schema_version": str(SCHEMA_VERSION)})
        (folder / CARD_NAME).write_text(model_card(self, repo_id or folder.name), encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(
        cls, repo_id_or_dir, revision: str | None = None, cache_dir=None, local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> "RDKVProfile":
        """Load a profile from a directory, a shipped profile name or a Hub repo.

        Resolution order: an existing directory; a profile shipped in ``rdkv_hf/profiles/<name>``
        (see :func:`shipped_profiles`); a Hub repo id through ``huggingface_hub.hf_hub_download``,
        which reads the local HF cache first and honours ``HF_HUB_OFFLINE``.
        """
        if not isinstance(repo_id_or_dir, (str, os.PathLike)):
            raise TypeError(f"`repo_id_or_dir` must be a repo id or a directory, got {type(repo_id_or_dir).__name__}")
        name = os.fspath(repo_id_or_dir)
        folder = _local_folder(name)
        if folder is not None:
            config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
            for p in (config_path, weights_path):
                if not p.is_file():
                    raise FileNotFoundError(f"{p} is missing: {folder} is not a complete RDKV profile (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        else:
            config_path, weights_path = _download(name, revision, cache_dir, local_files_only, token)
        return cls._load_files(Path(config_path), Path(weights_path), name_or_path=name)

    @classmethod
    def _load_files(cls, config_path: Path, weights_path: Path, name_or_path: str) -> "RDKVProfile":
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{config_path} is not valid JSON ({err}); the file is corrupted or truncated: download or save the profile again") from err
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
        missing = [k for k in ("schema_version", "fingerprint", "quantizer", "calibration") if k not in config]
        if missing:
            raise ValueError(f"{config_path} lacks the keys {missing}; it is not an RDKV profile config")
        version = config["schema_version"]
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ValueError(f"{config_path} has schema_version {version!r}; this rdkv_hf reads up to {SCHEMA_VERSION}: upgrade rdkv_hf")
        tensors = _read_safetensors(weights_path)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("fingerprint", "quantizer", "calibration", "compressed_layers", "name_or_path")]
        missing = [n for n in names if n not in tensors and n not in _RD_CURVES]
        if missing:
            raise ValueError(f"{weights_path} lacks the tensors {missing}; save the profile again with this rdkv_hf")
        try:
            profile = cls(
                fingerprint=config["fingerprint"], quantizer=config["quantizer"], calibration=config["calibration"],
                name_or_path=name_or_path, **{n: tensors[n] for n in names if n in tensors},
            )
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{weights_path} does not fit {config_path}: {err}") from err
        # Profiles saved before the field existed compress every layer.
        profile.compressed_layers = _layer_list(config.get("compressed_layers"), profile.num_layers, where=str(config_path))
        return profile

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False, commit_message: str = "Upload RDKV profile"):
        """Create (or reuse) the Hub model repo `repo_id` and upload this profile to it."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, repo_id=repo_id)
            return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=tmp, commit_message=commit_message)

    # -- looking at it --------------------------------------------------------------------------

    def _layer_bits(self, budget, integer, bounds, layers):
        """``(layers, k_bits, v_bits)``: the budget shared by `layers` (None: ``compressed_layers``),
        as the cache's planner does; rows of the other layers are 0."""
        layers = self.compressed_layers if layers is None else sorted({int(i) for i in layers})
        if not layers:  # every layer has a sliding window (Mistral 7B v0.1): the cache compresses none
            self.head_bits(budget, integer=integer, bounds=bounds)  # still check the arguments
            zeros = torch.zeros(self.num_layers, self.num_kv_heads, dtype=torch.long if integer else torch.float64, device="cpu")
            return layers, zeros, zeros
        kb, vb = _on_layers(lambda p: p.head_bits(budget, integer=integer, bounds=bounds), self, layers)
        return layers, kb, vb

    def _rdkv_bits(self, budget: float, layers) -> torch.Tensor | None:
        """``[layers, kv_heads]`` budgets ``rdkv+profile`` gives each head (K and V together) at
        `budget` from the RDKV curves, the default head floor included; None without curves or
        when `budget` is outside their range."""
        from .config import RDKVConfig
        from .planner import profile_head_bits

        if not self.has_rd_curves or not layers:
            return None
        try:
            kb, vb = profile_head_bits(RDKVConfig(budget=budget, mode="rdkv+profile", profile="x"), self, layers)
        except ValueError:
            return None
        return (kb + vb) / 2

    def _shared_by(self, layers) -> str:
        if not layers:
            return f"none of the {self.num_layers} layers"
        if len(layers) == self.num_layers:
            return f"all {self.num_layers} layers"
        return f"layers {', '.join(map(str, layers))} of {self.num_layers}"

    def show(self, budget: float = 2.5, *, integer: bool = True, bounds: tuple | None = None, layers=None) -> str:
        """A readable table: per layer and KV head, RateQuant's K and V bits at `budget`, beta, R^2,
        sensitivity, and (profiles with RDKV curves) the head budget ``rdkv+profile`` uses.

        `layers`: the layers sharing the budget (default ``compressed_layers``, as the cache); the
        others get one line, without bits.
        """
        default = layers is None
        layers, kb, vb = self._layer_bits(budget, integer, bounds, layers)
        rd = self._rdkv_bits(budget, layers)
        lo, hi = bounds or default_bounds(budget)
        fmt = "{:d}" if integer else "{:.2f}"
        fp = self.fingerprint
        lines = [
            f"RDKV profile {self.name_or_path or ''} ({fp['architecture']}, {self.num_layers} layers x "
            f"{self.num_kv_heads} KV heads, head_dim {fp['head_dim']}, weights {fp['weights_sha256']})".replace("  ", " "),
            f"budget {budget} bits ({'greedy' if integer else 'closed form'}, bounds [{lo}, {hi}]) shared by "
            f"{self._shared_by(layers)}: mean K {kb[layers].double().mean():.3f}, mean V {vb[layers].double().mean():.3f}"
            if layers else f"budget {budget} bits: no layer is compressed",
            f"{'layer':>5} {'head':>4} {'K bits':>6} {'V bits':>6} {'beta_K':>7} {'beta_V':>7} {'R2_K':>6} {'R2_V':>6} {'sens_K':>9} {'sens_V':>9}"
            + (f" {'RDKV':>6}" if rd is not None else ""),
        ]
        why = "not compressed (sliding window)" if default else "not compressed (not in `layers`)"
        for layer in range(self.num_layers):
            if layer not in layers:
                lines.append(f"{layer:>5} {'-':>4} {why}")
                continue
            for h in range(self.num_kv_heads):
                i = (layer, h)
                lines.append(
                    f"{layer:>5} {h:>4} {fmt.format(kb[i].item()):>6} {fmt.format(vb[i].item()):>6} "
                    f"{self.beta_k[i]:>7.3f} {self.beta_v[i]:>7.3f} {self.r2_k[i]:>6.3f} {self.r2_v[i]:>6.3f} "
                    f"{self.sens_k[i]:>9.3g} {self.sens_v[i]:>9.3g}" + (f" {rd[i].item():>6.2f}" if rd is not None else "")
                )
        if rd is not None:
            lines.append(f"RDKV: the budget `rdkv+profile` gives each head (K and V together) at {budget} bits, from the RDKV curves")
        return "\n".join(lines)

    def plot(self, budget: float, path, *, integer: bool = True, bounds: tuple | None = None, layers=None) -> Path:
        """Save a PNG heat map (layers x KV heads) of the K and V bits at `budget`, side by side.

        `layers`: as in :meth:`show`; the other layers are grey.
        """
        try:
            # A bare Figure renders with Agg and leaves pyplot's global backend alone.
            import matplotlib
            from matplotlib.figure import Figure
        except ImportError as err:
            raise ImportError("RDKVProfile.plot needs matplotlib: `pip install matplotlib`") from err
        import numpy as np

        layers, kb, vb = self._layer_bits(budget, integer, bounds, layers)
        lo, hi = bounds or default_bounds(budget)
        off = np.array([layer not in layers for layer in range(self.num_layers)])
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")
        fig = Figure(figsize=(3.5 + 1.2 * self.num_kv_heads, 2.0 + 0.25 * self.num_layers), layout="constrained")
        axes = fig.subplots(1, 2, squeeze=False)
        for ax, bits, title in zip(axes[0], (kb, vb), ("K bits", "V bits")):
            grid = np.ma.masked_array(bits.double().numpy(), mask=np.repeat(off[:, None], self.num_kv_heads, 1))
            im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{title}, mean {bits[layers].double().mean():.2f}", fontsize=10)
            ax.set_xlabel("KV head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(self.num_kv_heads))
            if len(layers) * self.num_kv_heads <= 400:
                for layer in layers:
                    for h in range(self.num_kv_heads):
                        b = bits[layer, h].item()
                        color = "w" if b < (lo + hi) / 2 else "k"
                        ax.text(h, layer, f"{b:g}" if integer else f"{b:.1f}", ha="center", va="center", fontsize=7, color=color)
        fig.colorbar(im, ax=axes[0].tolist(), label="bits")
        title = f"{self.fingerprint['architecture']}: RateQuant widths at {budget} bits"
        if off.any():
            title += f"\nshared by {self._shared_by(layers)}; grey: not compressed"
        fig.suptitle(title, fontsize=10)
        path = Path(path)
        fig.savefig(path, dpi=120, format="png")
        return path


# ---------------------------------------------------------------------------------------------
# Files


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped inside the package (``rdkv_hf/profiles/<name>``)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def _local_folder(name: str) -> Path | None:
    if os.path.isdir(name):
        return Path(name)
    if "/" not in name and "\\" not in name and (SHIPPED_DIR / name / CONFIG_NAME).is_file():
        return SHIPPED_DIR / name
    if name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or os.path.splitdrive(name)[0]:
        raise FileNotFoundError(f"profile directory {name!r} does not exist")
    return None


def _download(repo_id: str, revision, cache_dir, local_files_only, token) -> tuple[str, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    paths = []
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths.append(hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
            ))
        except HFValidationError as err:
            raise ValueError(
                f"{repo_id!r} is neither a directory, a shipped profile ({', '.join(shipped_profiles()) or 'none'}) "
                f"nor a valid Hub repo id: {err}"
            ) from err
        except (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, OSError) as err:
            raise OSError(
                f"cannot get {filename} of RDKV profile {repo_id!r}: it is not a local directory or a shipped "
                f"profile ({', '.join(shipped_profiles()) or 'none'}), and the Hub (or its offline cache) "
                f"gave {type(err).__name__}: {err}"
            ) from err
    return paths[0], paths[1]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it is corrupted or truncated: download or save the profile again") from err


def model_card(profile: RDKVProfile, repo_id: str) -> str:
    """The README.md of a saved profile: front matter, what it is, how to use it, a fit table."""
    fp, cal = profile.fingerprint, profile.calibration
    base = cal.get("model_id")
    front = ["---", "library_name: rdkv_hf", "tags:", "- rdkv_hf", "- kv-cache", "- kv-cache-quantization", "- ratequant", "- rdkv"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    layers, kb, vb = profile._layer_bits(2.5, True, None, None)
    ek, ev = profile.eps_tables()
    r2 = torch.cat([profile.r2_k.flatten(), profile.r2_v.flatten()])
    rows = []
    for layer in range(profile.num_layers):
        bits = (" ".join(str(int(b)) for b in t[layer]) if layer in layers else "-" for t in (kb, vb))
        rows.append(
            f"| {layer} | {profile.beta_k[layer].mean():.2f} | {profile.beta_v[layer].mean():.2f} "
            f"| {profile.r2_k[layer].min():.3f} | {profile.r2_v[layer].min():.3f} "
            f"| {_fmt(profile.sens_k[layer].mean().item())} | {_fmt(profile.sens_v[layer].mean().item())} "
            f"| {' | '.join(bits)} |"
        )
    rd = profile._rdkv_bits(2.5, layers)
    rd_text = ("" if rd is None else " It also holds RDKV curves: per head, the attention-output error of RDKV's\n"
               "own compression (eviction and quantization) at 0.25 to 8 bits and the loss gradient at those outputs,\n"
               "from which `rdkv+profile` sets each head's budget.")
    if rd is not None:
        rows = [row + f" {' '.join(f'{b:.1f}' for b in rd[i].tolist()) if i in layers else '-'} |" for i, row in enumerate(rows)]
    rd_col, rd_sep, rd_col_text = ("", "", "") if rd is None else (
        " RDKV bits @2.5 |", "---|", ", and RDKV bits the\nbudget of each head (K and V together) in `rdkv+profile` at 2.5 bits")
    rd_cal = ""
    if rd is not None and "rd_seqs" in cal:
        stride = cal["rd_query_stride"]
        rd_cal = (f"\nRDKV curves: the first {cal['rd_seqs']} sequences, the first {cal['rd_prompt']:.0%} of each compressed, "
                  f"{'every one' if stride == 1 else f'one in {stride}'} of the other queries measured.")
    compressed = ""
    if not layers:
        compressed = "\nEvery layer has a sliding window: the cache keeps them all uncompressed.\n"
    elif len(layers) < profile.num_layers:
        compressed = (
            f"\nThe cache compresses layers {', '.join(map(str, layers))} only ({len(layers)} of {profile.num_layers}, "
            "full attention) and shares\nthe budget among them; the other layers keep the model's sliding-window cache, uncompressed.\n"
        )
    body = f"""
# RDKV profile: {base or fp['architecture']}

A measured profile for `rdkv_hf` KV-cache compression of
`{fp['architecture']}` ({fp['num_layers']} layers x {fp['num_kv_heads']} KV heads, head_dim {fp['head_dim']},
K/V weights sha256 `{fp['weights_sha256']}`). It holds per KV head RateQuant sensitivities
(mean squared loss gradient at K and V) and distortion fits `D(b) = alpha * beta^-b` of the
`{profile.quantizer.get('name')}` quantizer (K per {profile.quantizer.get('k_axis')}, V per {profile.quantizer.get('v_axis')}),
and RDKV epsilon tables per layer.{rd_text}{' Weights: ' + cal['weights'] + '.' if cal.get('weights') else ''}
{compressed}
## Usage

```python
import rdkv_hf

model = rdkv_hf.patch(model, budget=2.5, profile="{repo_id}")
```

## Calibration

{cal.get('n_seqs')} sequences x {cal.get('seq_len')} tokens of {cal.get('source')}, seed {cal.get('seed')},
fits over widths {cal.get('widths')} ({cal.get('seconds')} s, mean loss {_fmt(float(cal.get('loss', float('nan'))))}).{rd_cal}
R^2 of the fits: {r2.min():.3f} to {r2.max():.3f}; beta_K {profile.beta_k.min():.2f} to {profile.beta_k.max():.2f},
beta_V {profile.beta_v.min():.2f} to {profile.beta_v.max():.2f}.

Global epsilon tables (relative distortion at 2, 4, 8 bits):
eps_K = {ek[2]:.4g}, {ek[4]:.4g}, {ek[8]:.3g}; eps_V = {ev[2]:.4g}, {ev[4]:.4g}, {ev[8]:.3g}.

## Fits per layer

Means over the KV heads of a layer (R^2: the worst head); the bits are the greedy RateQuant widths
per head at a mean of 2.5 code bits over the compressed layers ("-": not compressed){rd_col_text}.

| layer | beta_K | beta_V | R^2 K | R^2 V | sens K | sens V | K bits @2.5 | V bits @2.5 |{rd_col}
|---|---|---|---|---|---|---|---|---|{rd_sep}
""" + "\n".join(rows) + "\n"
    return "\n".join(front) + "\n" + body


def _layer_list(layers, n: int, where: str) -> list[int]:
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


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3g}"


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Segments of the lower convex hull of ``(budget, cost)`` points sorted by budget, from the
    first point to the cheapest one (beyond it more bits would not lower the cost)."""
    end = min(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    hull: list[tuple[float, float]] = []
    for p in points[: end + 1]:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return list(zip(hull, hull[1:]))
