"""Profiles as files: a folder laid out as a Hub model repo, shipped profiles, and the Hub itself.

A profile directory (or Hub repo) holds three files:

- ``config.json``: schema version, the model fingerprint, the quantizer, the calibration setup and
  ``compressed_layers``, the layers a cache compresses (absent in older profiles: all layers);
- ``profile.safetensors``: the measured tensors (see :class:`~rdkv_hf.RDKVProfile`); nothing is
  ever unpickled;
- ``README.md``: a generated model card (:func:`rdkv_hf.profile_card.model_card`).

Profiles shipped with the package live in ``rdkv_hf/data/profiles/<name>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from . import atomic
from .profile_card import model_card
from .version import __version__

SCHEMA_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "profile.safetensors"
CARD_NAME = "README.md"
SHIPPED_DIR = Path(__file__).parent / "data" / "profiles"
_META_FIELDS = ("fingerprint", "quantizer", "calibration", "compressed_layers", "name_or_path")


PROFILE_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, ".gitattributes")  # what a profile folder may hold


def check_destination(save_directory) -> Path:
    """`save_directory` as a place a profile can be saved to (checked before long work, such as a
    calibration): absent, empty or a profile folder; ``ValueError`` otherwise."""
    return atomic.check_destination(save_directory, PROFILE_FILES, "profile folder")


def save(profile, save_directory, repo_id: str | None = None) -> Path:
    """Write ``config.json``, ``profile.safetensors`` and ``README.md`` into `save_directory`, all at
    once (:func:`rdkv_hf.atomic.atomic_folder`: a save killed at any moment leaves the previous
    profile or the new one). ``config.json`` records the sha256 of the tensor file.

    Args:
        repo_id: the Hub id shown in the model card's usage snippet (default: the folder name).
    Returns:
        the directory.
    """
    from safetensors.torch import save_file

    folder = Path(save_directory)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in profile.tensors().items()}
    with atomic.atomic_folder(folder, PROFILE_FILES, "profile folder") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "schema_version": str(SCHEMA_VERSION)})
        config = _config(profile, tensors, atomic.sha256_file(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_NAME).write_text(model_card(profile, repo_id or folder.name), encoding="utf-8")
    return folder


def _config(profile, tensors: dict, weights_sha256: str) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "library_name": "rdkv_hf",
        "created_with": f"rdkv_hf {__version__}",
        "fingerprint": profile.fingerprint,
        "quantizer": profile.quantizer,
        "calibration": profile.calibration,
        "compressed_layers": profile.compressed_layers,
        "eps_widths": list(profile.EPS_WIDTHS),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "tensors_sha256": weights_sha256,
    }


def load(
    cls, repo_id_or_dir, revision: str | None = None, cache_dir=None, local_files_only: bool = False,
    token: str | bool | None = None,
):
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
    return _load_files(cls, Path(config_path), Path(weights_path), name_or_path=name)


def _load_files(cls, config_path: Path, weights_path: Path, name_or_path: str):
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
    for key in ("fingerprint", "quantizer", "calibration"):
        if not isinstance(config[key], dict):
            raise ValueError(f"{config_path}: `{key}` must be a JSON object, got {config[key]!r}; the file is damaged: save the profile again")
    if not isinstance(config["calibration"].get("widths"), list):
        raise ValueError(f"{config_path}: `calibration.widths` (the widths of the fits) is missing; the file is damaged: save the profile again")
    tensors = _read_safetensors(weights_path)
    expected = config.get("tensors_sha256")  # absent in profiles saved before it was recorded
    if expected is not None and atomic.sha256_file(weights_path) != expected:
        raise ValueError(
            f"{weights_path} is not the tensor file {config_path} was saved with (its sha256 differs): the files "
            "were mixed or damaged; save or download the profile again"
        )
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _META_FIELDS]
    missing = [n for n in names if n not in tensors and n not in cls.OPTIONAL_TENSORS]
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
    profile.compressed_layers = cls.layer_list(config.get("compressed_layers"), profile.num_layers, where=str(config_path))
    return profile


def push(profile, repo_id: str, token: str | None = None, private: bool = False, commit_message: str = "Upload RDKV profile"):
    """Create (or reuse) the Hub model repo `repo_id` and upload this profile to it."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(profile, tmp, repo_id=repo_id)
        return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=tmp, commit_message=commit_message)


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped inside the package (``rdkv_hf/profiles/<name>``)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def _local_folder(name: str) -> Path | None:
    if os.path.isdir(name):
        return Path(name)
    if os.path.isfile(name):
        raise ValueError(f"profile {name!r} is a file; give the profile's folder (it holds {CONFIG_NAME} and {WEIGHTS_NAME})")
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
