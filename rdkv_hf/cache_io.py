"""A compressed cache as files: save a context once, load it for every question that follows.

A saved cache is a folder of two files:

- ``rdkv_cache.json``: the format name and schema version, the model's fingerprint, the RDKV
  settings (and a digest of the profile they used), the token count and batch size, the layout of
  every layer, the sha256 of the tensors file, and free-form ``metadata`` (the command line keeps
  the model name and the question template there);
- ``rdkv_cache.safetensors``: every RDKV layer's packed segments (the flat buffers and the two
  tables of :mod:`rdkv_hf.storage`, as they are in memory) and full-precision tail, the K/V of
  Transformers' own layers (sliding windows), and the context's token ids when given. Nothing is
  ever unpickled.

Saving writes both files into a temporary folder beside the target and renames it into place, so a
folder is either a complete saved cache or absent; an existing saved cache is replaced the same
way. Loading checks the sha256 first (a truncated or altered file is refused before it is parsed),
then the model (its fingerprint must equal the saved one), then every table offset against its
buffer (the decode kernels read them unchecked).

This module knows the cache's layout but not its classes (``cache.py`` imports it): it turns a
cache into tensors and JSON, and files back into :class:`LayerState` records that
:meth:`rdkv_hf.RDKVCache.from_pretrained` puts into a fresh cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import quant
from .config import RDKVConfig
from .fingerprint import describe, fingerprint, same_shape, same_weights
from .planners import Planner, make_planner
from .state import patch_state
from .storage import H_N, Segment, SegmentBuffers
from .version import __version__

logger = logging.getLogger(__name__)

FORMAT = "rdkv_hf.cache"
SCHEMA_VERSION = 1
CONFIG_NAME = "rdkv_cache.json"
TENSORS_NAME = "rdkv_cache.safetensors"
_FILES = {CONFIG_NAME, TENSORS_NAME}
_BUFFERS = ("words", "meta", "raw", "perm", "heads", "groups")


@dataclass
class LayerState:
    """One layer of a loaded cache.

    ``kind``: ``"rdkv"`` (``segments``, the tail ``keys``/``values``, ``seen`` tokens), a
    Transformers layer (``keys``/``values`` and ``seen``, its ``get_seq_length()``), or
    ``"empty"`` (never written). ``cls``: the class name of the layer it was saved from.
    """

    kind: str
    cls: str
    seen: int = 0
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    segments: list[Segment] | None = None


@dataclass
class LoadedCache:
    """What :func:`load` read: the planner to continue with, the layers, the context's token ids."""

    planner: Planner
    layers: list[LayerState]
    context_ids: torch.Tensor | None
    meta: dict

    def fill(self, cache) -> None:
        """Put the loaded layers into `cache`, a fresh :class:`~rdkv_hf.RDKVCache` of the model."""
        ours, saved = [type(layer).__name__ for layer in cache.layers], [s.cls for s in self.layers]
        if ours != saved:
            raise ValueError(
                f"the saved cache has the layers {saved}, a cache of this model has {ours}: it was saved by another "
                "rdkv_hf or Transformers release; compress the context again"
            )
        for i, (layer, state) in enumerate(zip(cache.layers, self.layers)):
            if state.kind == "rdkv":
                layer.restore(state.segments, state.keys, state.values, state.seen)
            elif state.kind == "transformers":
                layer.update(state.keys, state.values)  # initializes the layer as a forward would
                if layer.get_seq_length() != state.seen and hasattr(layer, "cumulative_length"):
                    layer.cumulative_length = state.seen  # a sliding window keeps fewer tokens than it saw
                if layer.get_seq_length() != state.seen:
                    raise ValueError(f"layer {i} ({state.cls}) cannot be restored to {state.seen} tokens on this Transformers release")
        cache.context_ids = self.context_ids


# -- saving --------------------------------------------------------------------------------------


def save(cache, save_directory, model, context_ids: torch.Tensor | None = None, metadata: dict | None = None) -> Path:
    """Write `cache` (an :class:`~rdkv_hf.RDKVCache`) into `save_directory`; returns the folder.

    Args:
        model: the model the cache was filled by (its fingerprint is recorded).
        context_ids: ``[batch, tokens]`` the token ids the cache holds, so that questions can be
            appended to them in ``generate()`` (None: not saved).
        metadata: JSON-serializable notes kept as they are (e.g. a question template).
    """
    from safetensors.torch import save

    folder = Path(save_directory)
    if folder.exists() and (not folder.is_dir() or not set(os.listdir(folder)) <= _FILES):
        raise FileExistsError(
            f"{folder} exists and is not a saved RDKV cache (it holds other files); pick a new folder or remove it"
        )
    if cache.planner.config.decode_block is not None:
        raise ValueError(
            f"this cache compresses decoded tokens (decode_block={cache.planner.config.decode_block}); saving one is not "
            "supported yet (its pending blocks' attention sums are not saved): compress the context with decode_block=None "
            "(rdkv_hf.patch(model, ..., decode_block=None)), save it, and load it with the decode settings to generate with: "
            f"RDKVCache.from_pretrained(dir, model, decode_block={cache.planner.config.decode_block})"
        )
    if any(getattr(layer, "pending", 0) for layer in cache.layers):
        raise RuntimeError("the cache is in the middle of a forward (tokens not yet compressed); save it after the forward returns")
    cache.flush()  # tokens waiting for decoded queries (RDKVConfig.observe) are saved packed
    tensors, layers = {}, []
    rdkv = set(cache.rdkv_layers)
    batch = dtype = None
    for i, layer in enumerate(cache.layers):
        if any(getattr(layer, name, None) for name in ("conv_states", "recurrent_states")):
            raise ValueError(
                f"layer {i} keeps convolution or recurrent states (a hybrid model's linear-attention or Mamba layer): saving "
                "those is not supported yet; keep the cache in memory (cache.fork() shares it between questions)"
            )
        entry = {"class": type(layer).__name__}
        if not getattr(layer, "is_initialized", False):
            entry["kind"] = "empty"
        else:
            entry["kind"] = "rdkv" if i in rdkv else "transformers"
            entry["seen"] = int(layer.get_seq_length())
            tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"] = layer.keys, layer.values
            batch, dtype = int(layer.keys.shape[0]), layer.keys.dtype
            if i in rdkv:
                entry["segments"] = [_segment_entry(s, f"layers.{i}.segments.{j}", tensors) for j, s in enumerate(layer.segments)]
        layers.append(entry)
    if batch is None:
        raise ValueError("the cache is empty: run the context through the model with this cache first, then save it")
    if context_ids is not None:
        context_ids = torch.as_tensor(context_ids)
        tokens = cache.get_seq_length()
        if context_ids.dtype not in (torch.int32, torch.int64) or tuple(context_ids.shape) != (batch, tokens):
            raise ValueError(
                f"`input_ids` must be the [batch, tokens] = [{batch}, {tokens}] integer token ids the cache holds, got "
                f"{context_ids.dtype} of shape {tuple(context_ids.shape)}"
            )
        tensors["context_ids"] = context_ids.long()
    planner = cache.planner
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_with": f"rdkv_hf {__version__}",
        "transformers": _transformers_version(),
        "fingerprint": fingerprint(model),
        "settings": planner.config.to_dict(),
        "profile_sha256": profile_digest(planner.profile) if getattr(planner, "profile", None) is not None else None,
        "tokens": int(cache.get_seq_length()),
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "nbytes": int(cache.nbytes),
        "layers": layers,
        "has_context_ids": context_ids is not None,
        "metadata": metadata or {},
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    try:
        text = json.dumps(config, indent=1) + "\n"
    except TypeError as err:
        raise TypeError(f"`metadata` must be JSON-serializable: {err}") from err
    _write_atomically(folder, {CONFIG_NAME: text.encode("utf-8"), TENSORS_NAME: data})
    return folder


def _segment_entry(seg: Segment, prefix: str, tensors: dict) -> dict:
    buf = seg.buffers
    for name in _BUFFERS:
        tensors[f"{prefix}.{name}"] = getattr(buf, name)
    tensors[f"{prefix}.real_tokens"] = seg.real_tokens
    return {"batch": seg.batch, "kv_heads": seg.kv_heads, "head_dim": buf.head_dim, "v_dim": buf.v_dim, "max_tokens": int(buf.max_tokens)}


def _write_atomically(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` into a temporary folder beside `folder`, then rename it into place (replacing a
    saved cache there): a reader sees the old cache or the new one, never half of one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = None
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.rename(folder, old / "cache")
        os.rename(tmp, folder)
    except BaseException:
        if old is not None and not folder.exists():
            os.rename(old / "cache", folder)  # put the previous cache back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def profile_digest(profile) -> str:
    """sha256 (16 hex chars) of a profile's tensors: the profile a cache was compressed with."""
    h = hashlib.sha256()
    for name, t in sorted(profile.tensors().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# -- loading -------------------------------------------------------------------------------------


def read_config(directory) -> dict:
    """The JSON of a saved cache, checked for its format and schema version."""
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"saved cache folder {str(folder)!r} does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a saved RDKV cache (RDKVCache.save_pretrained writes it)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the saved cache is damaged; save the context again") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an RDKV cache config (its `format` is not {FORMAT!r}); save the context again")
    version = config.get("schema_version")
    if not isinstance(version, int) or version < 1 or version > SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {version!r}; this rdkv_hf reads 1 to {SCHEMA_VERSION}: upgrade rdkv_hf")
    missing = [k for k in ("fingerprint", "settings", "tokens", "batch", "layers", "tensors_sha256") if k not in config]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}: the saved cache is damaged; save the context again")
    return config


# Settings that decide only what happens to the tokens appended after loading (see `load`).
DECODE_SETTINGS = ("decode_block", "decode_window", "decode_novelty")


def load(directory, model, profile=None, decode: dict | None = None) -> LoadedCache:
    """Read a saved cache for `model` (see the module docstring for the checks).

    Args:
        profile: the :class:`~rdkv_hf.RDKVProfile` the cache was compressed with, for the modes
            that need one; by default the patched model's, or the one the settings name.
        decode: ``DECODE_SETTINGS`` to continue with instead of the saved ones (a saved cache
            never compresses decoded tokens: it was saved with ``decode_block=None``).
    """
    from safetensors.torch import load as load_bytes

    folder = Path(directory)
    config = read_config(folder)
    check_model(config, model, folder)
    path = folder / TENSORS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the saved cache {folder} is incomplete; save the context again")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != config["tensors_sha256"]:
        raise ValueError(
            f"{path} does not match the sha256 recorded in {CONFIG_NAME}: the file is truncated or altered; save the context again"
        )
    try:
        tensors = load_bytes(data)
    except Exception as err:  # safetensors raises its own error types for a malformed header
        raise ValueError(f"{path} is not a readable safetensors file ({err}); save the context again") from err
    param = next(model.parameters())
    dtype = getattr(model, "dtype", param.dtype)
    if config.get("dtype") != str(dtype).removeprefix("torch."):
        warnings.warn(
            f"the cache in {folder} was saved from a {config.get('dtype')} model and is loaded into a {dtype} one: its "
            "full-precision tails are cast, so generation will not match the saved model's token for token",
            stacklevel=3,
        )
    try:
        layers = [_layer_state(i, entry, tensors, param.device, dtype) for i, entry in enumerate(config["layers"])]
        ids = tensors.get("context_ids")
        if ids is not None and tuple(ids.shape) != (config["batch"], config["tokens"]):
            raise ValueError(f"context_ids has shape {tuple(ids.shape)}, expected [{config['batch']}, {config['tokens']}]")
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"the saved cache {folder} is inconsistent ({err}); save the context again") from err
    planner = _planner(config, model, profile, folder, decode or {})
    return LoadedCache(planner, layers, None if ids is None else ids.to(param.device), config)


def check_model(config: dict, model, folder) -> None:
    """Refuse a cache saved from another model: other shapes, or K/V weights whose hashes differ at
    every 16-bit precision both record (a float32 and a bfloat16 load of one checkpoint agree)."""
    saved, ours = config["fingerprint"], fingerprint(model)
    if not (same_shape(saved, ours) and same_weights(saved, ours)):
        raise ValueError(
            f"the cache in {folder} was saved from another model: it was compressed by [{describe(saved)}], this model is "
            f"[{describe(ours)}]; load it into the model that made it, or compress the context again with this one"
        )


def _layer_state(i: int, entry: dict, tensors: dict, device, dtype) -> LayerState:
    kind, cls = entry["kind"], entry["class"]
    if kind == "empty":
        return LayerState(kind, cls)
    if kind not in ("rdkv", "transformers"):
        raise ValueError(f"layer {i} has unknown kind {kind!r}")
    keys, values = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
    if keys.dim() != 4 or keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"layer {i}: keys {tuple(keys.shape)} and values {tuple(values.shape)} are not [batch, heads, tokens, dim]")
    state = LayerState(kind, cls, int(entry["seen"]), keys.to(device, dtype), values.to(device, dtype))
    if kind == "rdkv":
        state.segments = [_segment(f"layers.{i}.segments.{j}", seg, tensors, device) for j, seg in enumerate(entry["segments"])]
        stored = sum(int(s.buffers.heads[:, H_N].max()) if s.buffers.heads.shape[0] else 0 for s in state.segments)
        if stored + keys.shape[2] > state.seen:
            raise ValueError(f"layer {i} stores more tokens ({stored} packed + {keys.shape[2]} in the tail) than it saw ({state.seen})")
    return state


def _segment(prefix: str, entry: dict, tensors: dict, device) -> Segment:
    parts = {name: tensors[f"{prefix}.{name}"] for name in _BUFFERS}
    batch, kv_heads, head_dim = int(entry["batch"]), int(entry["kv_heads"]), int(entry["head_dim"])
    v_dim = int(entry.get("v_dim", head_dim))
    check_tables(parts, batch * kv_heads, head_dim, prefix, v_dim)
    longest = int(parts["heads"][:, H_N].max()) if batch * kv_heads else 0
    buffers = SegmentBuffers(**{k: v.to(device) for k, v in parts.items()}, head_dim=head_dim,
                             max_tokens=max(int(entry["max_tokens"]), longest), v_dim=v_dim)  # the kernels size their grid by it
    # Rows that are the same head (beams, forks) share one view, as they did in memory.
    views, heads = {}, []
    for r, row in enumerate(parts["heads"].tolist()):
        key = tuple(row)
        if key not in views:
            views[key] = buffers.view_head(r)
        heads.append(views[key])
    return Segment(heads, batch, kv_heads, tensors[f"{prefix}.real_tokens"], buffers)


def check_tables(parts: dict, rows: int, head_dim: int, where: str, v_dim: int | None = None) -> None:
    """Raise ``ValueError`` unless the head and group tables of a segment describe its buffers: every
    range inside its buffer, row lengths and word counts as :func:`rdkv_hf.storage.pack_segment`
    lays them out (the decode kernels trust them). `head_dim`: K's width; `v_dim`: V's (None: K's)."""
    v_dim = head_dim if v_dim is None else v_dim
    heads, groups, perm = parts["heads"], parts["groups"], parts["perm"]
    if heads.dtype != torch.int64 or tuple(heads.shape) != (rows, 6):
        raise ValueError(f"{where}.heads must be int64 [{rows}, 6], got {heads.dtype} {tuple(heads.shape)}")
    if groups.dtype != torch.int64 or groups.dim() != 2 or groups.shape[1] != 7:
        raise ValueError(f"{where}.groups must be int64 [groups, 7], got {groups.dtype} {tuple(groups.shape)}")
    if parts["words"].dtype != torch.int32 or parts["meta"].dtype != torch.float16 or perm.dtype not in (torch.uint8, torch.int16):
        raise ValueError(f"{where}: the buffers must be int32 words, float16 meta and uint8/int16 perm")
    if perm.numel() and not (0 <= int(perm.min()) and int(perm.max()) < head_dim):
        raise ValueError(f"{where}.perm holds channels outside [0, {head_dim})")
    table = groups.tolist()
    sizes = {"words": parts["words"].numel(), "raw": parts["raw"].numel(), "meta": parts["meta"].numel()}
    for gi, (bits, count, length, row_words, data, meta, _) in enumerate(table):
        words = length if bits == 16 else quant.packed_words(length, bits) if 1 <= bits <= 8 else -1
        buffer = "raw" if bits == 16 else "words"
        if words < 0 or min(count, length, data) < 0 or row_words != words or data + count * row_words > sizes[buffer]:
            raise ValueError(f"{where}: group {gi} ({bits} bits, {count} rows of {length}) does not fit its buffer")
        if bits < 16 and (meta < 0 or meta + 2 * count > sizes["meta"]):
            raise ValueError(f"{where}: the scales of group {gi} lie outside the segment's buffers")
    for r, (n, v0, v1, k0, k1, p) in enumerate(heads.tolist()):
        if not (0 <= v0 <= v1 <= k0 <= k1 <= len(table)) or n < 0:
            raise ValueError(f"{where}: head {r} has a bad group range or token count")
        if sum(table[g][1] for g in range(v0, v1)) != n or any(table[g][2] != v_dim for g in range(v0, v1)):
            raise ValueError(f"{where}: the V groups of head {r} do not hold its {n} tokens of {v_dim}")
        kept = sum(table[g][1] for g in range(k0, k1))
        if kept > head_dim or any(table[g][2] != n for g in range(k0, k1)):
            raise ValueError(f"{where}: the K groups of head {r} do not hold channels of its {n} tokens")
        if (p == -1 and kept not in (0, head_dim)) or p < -1 or (p >= 0 and p + kept > perm.numel()):
            raise ValueError(f"{where}: the channel order of head {r} lies outside the segment's buffers")


def _planner(config: dict, model, profile, folder, decode: dict) -> Planner:
    """The planner the saved cache was compressed with (its settings and, if it needs one, the
    same profile), so that what the loaded cache compresses next matches what the saved one would;
    `decode` replaces the saved ``DECODE_SETTINGS``."""
    try:
        settings = RDKVConfig.from_dict(config["settings"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{folder / CONFIG_NAME} holds settings this rdkv_hf cannot use ({err}); upgrade rdkv_hf or save the context again") from err
    settings = _continue_with(settings, decode, model)
    from .model_patches import compressed_layers
    from .planners import planner_class

    wanted = config.get("profile_sha256")
    if planner_class(settings.mode).needs_profile:
        profile = _find_profile(settings, wanted, model, profile, folder)
    planner = make_planner(settings, profile, compressed_layers(model))
    if planner.config != settings:
        raise ValueError(f"{folder / CONFIG_NAME}: the settings {settings} do not rebuild the same planner ({planner.config}); save the context again")
    return planner


def _continue_with(settings: RDKVConfig, decode: dict, model) -> RDKVConfig:
    """`settings` with the decode settings the caller gave; warns when the patched model compresses
    decoded tokens and the loaded cache would not (the cache keeps its own settings)."""
    unknown = sorted(set(decode) - set(DECODE_SETTINGS))
    if "max_cache_bytes" in unknown:
        raise ValueError(
            "a loaded cache cannot be held under `max_cache_bytes` yet: its saved segments lack the token weights a "
            "re-allocation under the cap ranks them by; compress the context under the cap in memory instead "
            "(rdkv_hf.patch(model, ..., decode_block=128, max_cache_bytes=...)) and keep the cache with cache.fork()"
        )
    if unknown:
        raise TypeError(f"unexpected settings {unknown}: a loaded cache takes only {list(DECODE_SETTINGS)}; the others are saved with it")
    if decode:
        return settings.replace(**decode)
    state = patch_state(model)
    ours = {} if state is None else {k: getattr(state.config, k) for k in DECODE_SETTINGS}
    if ours.get("decode_block") is not None and settings.decode_block is None:
        given = ", ".join(f"{k}={v!r}" for k, v in ours.items() if v is not None)
        warnings.warn(
            f"the model is patched with {given}, but a loaded cache keeps the settings it was saved with (decode_block=None): "
            f"the tokens it generates stay in full precision; pass them to load it compressing decoded tokens: "
            f"RDKVCache.from_pretrained(dir, model, {given})",
            stacklevel=4,
        )
    return settings


def _find_profile(settings: RDKVConfig, wanted: str | None, model, profile, folder):
    state = patch_state(model)
    candidates = [("`profile`", profile)] if profile is not None else []
    if profile is None and state is not None and state.profile is not None:
        candidates.append(("the patched model's profile", state.profile))
    if profile is None and settings.profile:
        candidates.append((f"profile {settings.profile!r}", None))
    for name, p in candidates:
        if p is None:
            from .profile import RDKVProfile

            p = RDKVProfile.from_pretrained(settings.profile)
            p.check_model(model)
        if wanted is None or profile_digest(p) == wanted:
            return p
        logger.info("rdkv_hf: %s is not the profile the cache in %s was compressed with", name, folder)
    tried = ", ".join(name for name, _ in candidates) or "none was given"
    raise ValueError(
        f"the cache in {folder} was compressed in mode {settings.mode!r} with a profile (sha256 {wanted}) that is not at hand "
        f"({tried}); pass it: RDKVCache.from_pretrained(dir, model, profile=...)"
    )
