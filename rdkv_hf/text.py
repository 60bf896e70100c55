"""Shipped natural text (King James Bible, public domain): calibration and held-out evaluation text.

- ``load_text(split)``: the calibration or the held-out evaluation text (``rdkv_hf/data/``).
- ``token_chunks(...)``: random, non-overlapping token windows, e.g. for calibration or perplexity.

The two splits hold different books (see ``data/README.md``), so nothing calibrated on ``"calib"``
has seen the ``"eval"`` text. The text has no digits (the recall prompts of
:mod:`rdkv_hf.eval.prompts` rely on it).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"
SPLITS = {"calib": "kjv_calib.txt", "eval": "kjv_eval.txt"}

@functools.cache
def load_text(split: str = "calib") -> str:
    """The shipped text of `split` ("calib" or "eval"): paragraphs (one per chapter) joined by blank lines."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {sorted(SPLITS)}, got {split!r}")
    return (DATA_DIR / SPLITS[split]).read_text(encoding="utf-8")


def encode_text(tokenizer, split: str = "calib") -> torch.Tensor:
    """All of `split` as one run of token ids, without special tokens.

    Returns:
        ``[n]`` LongTensor.
    """
    ids = tokenizer(
        load_text(split), add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device="cpu")


def token_chunks(
    tokenizer, n_chunks: int, n_tokens: int, split: str = "calib", seed: int = 0
) -> torch.Tensor:
    """`n_chunks` windows of `n_tokens` tokens taken at random, non-overlapping places of `split`.

    Starts are drawn uniformly among all non-overlapping placements (a fixed `seed` gives the same
    chunks) and returned in text order. No BOS or other special token is added.

    Returns:
        ``[n_chunks, n_tokens]`` LongTensor.
    """
    if n_chunks < 1 or n_tokens < 1:
        raise ValueError(f"`n_chunks` and `n_tokens` must be >= 1, got {n_chunks} and {n_tokens}")
    ids = encode_text(tokenizer, split)
    if len(ids) < n_chunks * n_tokens:
        raise ValueError(
            f"{n_chunks} x {n_tokens} tokens do not fit in the {len(ids)} tokens of split {split!r}; "
            "ask for fewer or shorter chunks"
        )
    return random_chunks(ids, n_chunks, n_tokens, seed)


def random_chunks(ids: torch.Tensor, n_chunks: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """``[n_chunks, n_tokens]`` non-overlapping windows of ``ids [N]`` at seeded random places, in
    text order (starts drawn uniformly among all non-overlapping placements)."""
    slack = len(ids) - n_chunks * n_tokens
    assert slack >= 0, "callers check that the chunks fit"
    gen = torch.Generator().manual_seed(seed)
    # Sorted gaps before each chunk: chunk i starts after i whole chunks plus gap i.
    gaps = torch.randint(0, slack + 1, (n_chunks,), generator=gen, device="cpu").sort().values
    starts = gaps + torch.arange(n_chunks, device="cpu") * n_tokens
    return torch.stack([ids[s : s + n_tokens] for s in starts.tolist()])
