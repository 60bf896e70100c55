"""Compress once, ask many: a long context is run through a patched model once, and questions are
asked over its packed cache, each on a fork that shares the packed segments.

    ids, template = context_prompt(tokenizer, document)       # the document as a prompt's start
    cache = prefill(model, torch.tensor([ids]), progress=True)   # compressed layer by layer
    cache.save_pretrained("ctx")                               # later, elsewhere:
    cache = RDKVCache.from_pretrained("ctx", model)
    answers = ask(model, cache, [question_ids(tokenizer, template, q) for q in questions], max_new_tokens=32)

A batch of questions of different lengths is padded between the context and each question (left
padding of the questions): every row's context is the same cached tokens, and the attention mask
hides the pads (a compressed follow-up evicts them).
"""

from __future__ import annotations

import torch

from .cache import RDKVCache
from .compat import cache_kwargs

QUESTION = "{question}"  # where a question goes in a question template
_MARK = "\u2063RDKV-QUESTION\u2063"  # stands for the question while a chat template is rendered


def context_prompt(tokenizer, document: str, *, chat: bool | None = None, separator: str = "\n\n",
                   raw_template: str = "Question: {question}\nAnswer:") -> tuple[list[int], str]:
    """The token ids of `document` as the start of a prompt, and the template of what follows it.

    With a chat template (`chat` None: when the tokenizer has one) the document and the question
    are one user message (``document + separator + question``), and the template closes the turn
    and opens the assistant's; without one the document is raw text (with the tokenizer's BOS)
    followed by ``separator + raw_template``.

    Returns:
        ``(ids, template)``: the template holds ``{question}``; see :func:`question_ids`.
    """
    chat = tokenizer.chat_template is not None if chat is None else chat
    if not chat:
        if QUESTION not in raw_template:
            raise ValueError(f"`raw_template` must contain {QUESTION!r}, got {raw_template!r}")
        return tokenizer(document).input_ids, separator + raw_template
    if tokenizer.chat_template is None:
        raise ValueError("`chat=True` needs a tokenizer with a chat template; pass chat=False")
    text = tokenizer.apply_chat_template([{"role": "user", "content": document + separator + _MARK}],
                                         add_generation_prompt=True, tokenize=False)
    if text.count(_MARK) != 1:
        raise ValueError("the chat template does not keep the user message as it is; pass chat=False")
    head, tail = text.split(_MARK)
    # The template holds its special tokens (BOS, role markers) as text.
    return tokenizer(head, add_special_tokens=False).input_ids, QUESTION + tail


def question_ids(tokenizer, template: str, question: str) -> list[int]:
    """The token ids that follow the context for `question` (:func:`context_prompt`'s template)."""
    if not question.strip():
        raise ValueError("a question must not be empty")
    return tokenizer(template.replace(QUESTION, question), add_special_tokens=False).input_ids


def _decoder_layers(model) -> list:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    return list(getattr(decoder, "layers", None) or [])


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, cache: RDKVCache | None = None,
            progress: bool = False) -> RDKVCache:
    """Run a context through a patched model into an :class:`RDKVCache`, compressed layer by layer.

    Args:
        input_ids: ``[batch, tokens]``; attention_mask: ``[batch, tokens]`` for left padding.
        cache: the cache to fill (default: a new ``RDKVCache(model)``).
        progress: a tqdm bar that advances as each decoder layer finishes.
    Returns:
        the cache, with ``context_ids`` set to `input_ids` (saved by ``save_pretrained``).
    """
    from tqdm.auto import tqdm

    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"`input_ids` must be [batch, tokens] with at least one token, got shape {tuple(input_ids.shape)}")
    cache = RDKVCache(model) if cache is None else cache
    layers = _decoder_layers(model)
    bar = tqdm(total=len(layers), desc=f"prefill {input_ids.shape[1]} tokens", unit="layer", disable=not progress)

    def advance(*_) -> None:  # a forward hook that returns something replaces the layer's output
        bar.update(1)

    hooks = [layer.register_forward_hook(advance) for layer in layers]
    try:
        device = next(model.parameters()).device
        mask = None if attention_mask is None else attention_mask.to(device)
        model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    # A context for many questions has no one answer whose queries should weigh it (`observe`):
    # it is packed now, by its own last queries.
    cache.flush()
    cache.context_ids = input_ids.to(device)
    return cache


def question_batch(context_ids: torch.Tensor, questions: list, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[N, tokens + longest]``: the context then each
    question, its pads between the two (the context's tokens stay where the cache has them).

    Args:
        context_ids: ``[1, tokens]``; questions: N lists (or 1-D tensors) of token ids.
    """
    if context_ids.dim() != 2 or context_ids.shape[0] != 1:
        raise ValueError(f"the context must be one row [1, tokens] to ask a batch of questions, got {tuple(context_ids.shape)}")
    questions = [torch.as_tensor(q, dtype=torch.long).reshape(-1) for q in questions]
    if not questions or any(q.numel() == 0 for q in questions):
        raise ValueError("give at least one question, each at least one token long")
    T, L, N = context_ids.shape[1], max(q.numel() for q in questions), len(questions)
    ids = torch.full((N, T + L), pad_token_id, dtype=torch.long)
    mask = torch.zeros(N, T + L, dtype=torch.long)
    ids[:, :T], mask[:, :T] = context_ids.cpu(), 1
    for i, q in enumerate(questions):
        ids[i, T + L - q.numel():], mask[i, T + L - q.numel():] = q, 1
    return ids.to(context_ids.device), mask.to(context_ids.device)


@torch.no_grad()
def ask(model, cache: RDKVCache, questions: list, *, batch_size: int | None = None, **generate_kwargs) -> list[list[int]]:
    """Answer each question over the context `cache` holds; the cache itself is left as it is.

    The questions run on forks of the cache (:meth:`RDKVCache.fork`: the packed context is shared),
    `batch_size` at a time in one padded ``generate()`` (default: all at once; 1: one by one).
    A model with sliding-window layers (Gemma 3) batches only questions of equal length: a pad
    takes a slot of Transformers' window (it counts positions), so a padded question would see
    fewer context tokens there than asked alone.

    Args:
        cache: a one-row cache with ``context_ids`` (from :func:`prefill` or ``from_pretrained``).
        questions: token ids of each question (see :func:`question_ids`).
        **generate_kwargs: passed to ``generate()`` (``max_new_tokens``, ...); greedy by default.
    Returns:
        the generated token ids of each answer, up to its first end-of-sequence token.
    """
    if cache.context_ids is None:
        raise ValueError("the cache does not know its context's token ids: fill it with prefill(), or save it with "
                         "save_pretrained(dir, input_ids=...) and load it with RDKVCache.from_pretrained")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive int or None (all at once), got {batch_size!r}")
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else []
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    pad = generate_kwargs.pop("pad_token_id", None)
    pad = pad if pad is not None else gen.pad_token_id if gen.pad_token_id is not None else min(eos, default=0)
    generate_kwargs.setdefault("do_sample", False)
    sliding = any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    answers: list = [None] * len(questions)
    lengths = [torch.as_tensor(q).numel() for q in questions]
    for rows in _batches(lengths, batch_size or len(questions), equal_lengths=sliding):
        ids, mask = question_batch(cache.context_ids, [questions[i] for i in rows], pad)
        out = model.generate(ids, attention_mask=mask, pad_token_id=pad, **cache_kwargs(cache.fork(len(rows))), **generate_kwargs)
        out = getattr(out, "sequences", out)  # return_dict_in_generate=True
        for i, row in zip(rows, out[:, ids.shape[1] :].tolist()):
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            answers[i] = row[:cut]
    return answers


def _batches(lengths: list[int], size: int, equal_lengths: bool) -> list[list[int]]:
    """Indices of the questions of each ``generate()`` call, at most `size` a call (and of one
    length each with `equal_lengths`)."""
    order = list(range(len(lengths)))
    if not equal_lengths:
        return [order[i : i + size] for i in range(0, len(order), size)]
    out = []
    for n in sorted(set(lengths)):
        same = [i for i in order if lengths[i] == n]
        out += [same[i : i + size] for i in range(0, len(same), size)]
    return out
