"""The demo's recall prompt: a five-digit code hidden in a haystack of held-out text.

``recall_prompt(...)`` puts the code in a haystack of evaluation text, with the question in the same
user message, rendered with the tokenizer's chat template; for a base model (no chat template, e.g.
Gemma-3-270m) as raw text ending in an answer prefix, the way :func:`rdkv_hf.eval.tasks.render`
renders RULER prompts with ``chat=False``. The shipped text has no digits, so the hidden code is the
only number in the prompt.
"""

from __future__ import annotations

import random
import re

import torch

from ..text import load_text

# The recall prompt. A small instruct model needs the instruction before the text (why this wording:
# benchmarks/results/knobs.md).
RECALL_FACT = "The secret code of the blue door is {code}."
RECALL_QUESTION = "What is the secret code of the blue door?"
RECALL_INTRO = (
    "Somewhere in the following text there is a secret code. Read the text and then answer "
    "the question: {question}"
)
RECALL_OUTRO = "{question} Answer with the five-digit number."
# The answer's start: raw prompts (base models) end with "Answer: " and it, so that the next tokens
# are the code; the stream (eval.stream) puts it at the start of the assistant's turn (RULER's way).
RECALL_ANSWER = "The secret code of the blue door is"
RECALL_ANSWER_PREFIX = "Answer: " + RECALL_ANSWER



def _render(tokenizer, haystack: str, chat: bool = True) -> list[int]:
    """Token ids of the whole prompt around `haystack`: the chat prompt, ready for the assistant's
    answer, or (``chat=False``) the raw text, a space and ``RECALL_ANSWER_PREFIX`` with the
    tokenizer's special tokens, as ``tasks.render_prompt`` renders a RULER prompt."""
    question = RECALL_QUESTION
    content = (
        RECALL_INTRO.format(question=question)
        + "\n\n"
        + haystack
        + "\n\n"
        + RECALL_OUTRO.format(question=question)
    )
    if not chat:
        from .tasks import render_prompt

        return list(render_prompt(content, RECALL_ANSWER_PREFIX, tokenizer, chat=False))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)


def _haystack(tokenizer, n_tokens: int, start: int) -> str:
    """At most `n_tokens` tokens of eval text from char `start`, ending at a clause end (.;:?!) or,
    if that would lose more than 1% of the text, at a word end."""
    piece = load_text("eval")[start : start + 8 * n_tokens + 200]
    offsets = tokenizer(
        piece, add_special_tokens=False, return_offsets_mapping=True, verbose=False
    )["offset_mapping"]
    if len(offsets) <= n_tokens:
        return piece.strip()
    limit = offsets[n_tokens - 1][1]
    ends = [m.end() for m in re.finditer(r"[.;:?!]", piece[:limit])]
    if not ends or ends[-1] < 0.99 * limit:
        ends = [m.start() for m in re.finditer(r"\s", piece[: limit + 1])]
    return piece[: ends[-1] if ends else limit].strip()


def _insert(haystack: str, fact: str, depth: float) -> str:
    """Put `fact` after the sentence end nearest to `depth` (0 = start, 1 = end) of `haystack`."""
    target = int(depth * len(haystack))
    ends = [m.end() for m in re.finditer(r"[.?!]\s", haystack)] + [len(haystack)]
    pos = 0 if depth <= 0 else min(ends, key=lambda e: abs(e - target))
    before, after = haystack[:pos].rstrip(), haystack[pos:].lstrip()
    return " ".join(p for p in (before, fact, after) if p)


def recall_prompt(
    tokenizer, n_tokens: int = 2500, seed: int = 0, depth: float | None = None, chat: bool | None = None
) -> tuple[torch.Tensor, str]:
    """A needle-in-a-haystack prompt: a random five-digit code hidden in held-out text.

    The fact "The secret code of the blue door is NNNNN." sits at `depth` of a haystack of "eval"
    text; the question comes in the same user message; the chat template adds the assistant turn.
    Without the chat template (base models) the prompt is raw text ending in
    ``RECALL_ANSWER_PREFIX`` ("Answer: The secret code of the blue door is"), after the tokenizer's
    BOS if it adds one. Check an answer with ``answer in generated_text``.

    Args:
        tokenizer: a tokenizer (with a chat template unless ``chat=False``).
        n_tokens: total prompt length to aim for (the result is within a few tokens of it).
        seed: picks the code, the haystack's place in the text and, if `depth` is None, the depth.
        depth: where the fact goes, 0 (start of the haystack) to 1 (end); None draws it from `seed`.
        chat: use the chat template; None: if the tokenizer has one (instruct models), else raw text.
    Returns:
        ``(input_ids [1, T], answer)``, ``answer`` the code as a string of five digits.
    """
    if n_tokens < 200:
        raise ValueError(f"`n_tokens` must be at least 200 to hold the question and a haystack, got {n_tokens}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"`depth` must be in [0, 1] or None, got {depth}")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat is None:
        chat = has_template
    elif chat and not has_template:
        raise ValueError(
            "`chat=True` but `tokenizer` has no chat template; pass chat=False (or None) for a base "
            "model's raw-text prompt, or use an instruct model's tokenizer (e.g. load_model('smollm2-135m'))"
        )
    rng = random.Random(seed)
    code = str(rng.randint(10000, 99999))
    if depth is None:
        depth = rng.uniform(0.1, 0.9)
    fact = RECALL_FACT.format(code=code)
    text = load_text("eval")
    # Start at a paragraph (chapter) beginning far enough from the end to fill the haystack.
    paragraph_starts = [0] + [m.end() for m in re.finditer(r"\n\n", text)]
    usable = [s for s in paragraph_starts if s < len(text) - 8 * n_tokens]
    start = rng.choice(usable)

    want = n_tokens - len(_render(tokenizer, fact, chat))
    best = None
    for _ in range(3):  # the cut at a clause end and the joins shift the count; correct twice
        ids = _render(tokenizer, _insert(_haystack(tokenizer, want, start), fact, depth), chat)
        if best is None or abs(len(ids) - n_tokens) < abs(len(best) - n_tokens):
            best = ids
        if len(ids) == n_tokens:
            break
        want += n_tokens - len(ids)
    return torch.tensor([best], dtype=torch.long, device="cpu"), code
