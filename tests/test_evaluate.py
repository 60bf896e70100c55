"""Tests of `rdkv-hf eval` (rdkv_hf/eval/runner.py, rdkv_hf/eval/report.py) on tiny random models."""

import json
import re

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from transformers import DynamicCache, QuantizedCache

import rdkv_hf
from rdkv_hf import RDKVCache
from rdkv_hf.calibration import calibrate
from rdkv_hf.cli import main
from rdkv_hf.compat import cache_kwargs
from rdkv_hf.config import RDKVConfig
from rdkv_hf.eval import runner as ev
from rdkv_hf.planners import modes
from rdkv_hf.planners.eviction import SnapKVPlanner

PROMPT, CONT = 96, 24


def tiny_budget(method):
    """2.5 bits, but 5 for RateQuant: with head_dim 16 its per-token scales alone cost 2 bits."""
    return (5.0 if method.mode == "ratequant" else 2.5) if method.budgeted else None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def profile(model):
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    return calibrate(model, ids, progress=False)


def windows(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (1, PROMPT + CONT + 1), generator=g) for _ in range(n)]


def settings(**kw):
    base = dict(tasks=("ppl", "distortion"), methods=("full", "rdkv"), budgets=(2.5,), windows=2,
                ppl_length=PROMPT, continuation=CONT)
    return ev.EvalSettings("tiny", **(base | kw))


# --- the shared prompt forward is the patched model's own -------------------------------------


def _direct(model, ids, cache_for):
    """Prompt then continuation through the patched model, as a user would run them."""
    cache = cache_for()
    with torch.no_grad():
        model(ids[:, :PROMPT], **cache_kwargs(cache))
        nbytes = ev.cache_nbytes(cache)
        logits = model(ids[:, PROMPT : PROMPT + CONT], **cache_kwargs(cache)).logits
    return nbytes, logits


@pytest.mark.parametrize("spec", ["rdkv", "rdkv+profile", "ratequant", "uniform-2", "snapkv", "quanto-2", "full"])
def test_shared_prefill_fills_the_same_cache_as_the_model(model, profile, spec):
    method = ev.parse_method(spec)
    ids = windows(1)[0]
    budget = tiny_budget(method)
    pre = ev.prefill(model, ids[:, :PROMPT])
    rdkv_hf.patch(model, budget=16)
    try:
        with torch.no_grad():
            shared = ev.build_cache(model, pre, method, budget, profile)
            nbytes = ev.cache_nbytes(shared)
            logits = model(ids[:, PROMPT : PROMPT + CONT], **cache_kwargs(shared)).logits
        rdkv_hf.unpatch(model)
        if method.kind == "quanto":
            ref = _direct(model, ids, lambda: QuantizedCache(backend="quanto", config=model.config, nbits=2))
        elif method.kind == "full":
            ref = _direct(model, ids, lambda: DynamicCache(config=model.config))
        else:
            if method.kind == "eviction":
                rdkv_hf.patch(model, budget=2.5, compress_followups=False)
                planner = SnapKVPlanner(RDKVConfig(budget=2.5, compress_followups=False))
                make = lambda: RDKVCache(model, planner=planner)  # noqa: E731
            else:
                b = ev.uniform_budget(2, 16, PROMPT) if method.mode == "uniform" else budget
                rdkv_hf.patch(model, budget=b, mode=method.mode, profile=profile if method.needs_profile else None,
                              compress_followups=False)
                make = lambda: RDKVCache(model)  # noqa: E731
            ref = _direct(model, ids, make)
    finally:
        rdkv_hf.unpatch(model)
    assert nbytes == ref[0]
    assert torch.equal(logits, ref[1])


def test_greedy_decode_matches_generate(model):
    ids = windows(1)[0][:, :PROMPT]
    rdkv_hf.patch(model, budget=2.5, compress_followups=False)
    try:
        ref = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)[0, PROMPT:].tolist()
        pre = ev.prefill(model, ids)
        cache = ev.build_cache(model, pre, ev.parse_method("rdkv"), 2.5)
        got = ev.greedy_decode(model, cache, pre.logits, 8, eos_ids=set())
    finally:
        rdkv_hf.unpatch(model)
    assert got == ref


# --- evaluate(): results, resumability, reports -----------------------------------------------


def test_budget_16_rdkv_perplexity_equals_the_full_cache(model, tmp_path):
    s = settings(methods=("full", "rdkv:high_precision_dtype=float32"), budgets=(16,))
    recs = ev.evaluate(model, None, s, tmp_path, window_ids=windows(), progress=False)
    ppl = {(r["method"], r["seed"]): r["value"] for r in recs if r["task"] == "ppl"}
    for seed in (0, 1):
        assert ppl[("rdkv:high_precision_dtype=float32", seed)] == pytest.approx(ppl[("full", seed)], rel=1e-5)
    dist = [r["value"] for r in recs if r["task"] == "distortion" and r["method"] != "full"]
    assert len(dist) == 2 and max(dist) < 1e-5
    assert not rdkv_hf.is_patched(model)


def test_second_run_computes_nothing(model, tmp_path, monkeypatch):
    s = settings()
    first = ev.evaluate(model, None, s, tmp_path, window_ids=windows(), progress=False)
    assert len(first) == 2 * 2 * 2  # tasks x methods x windows
    lines = (tmp_path / ev.RESULTS_FILE).read_text().splitlines()

    def fail(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(ev, "prefill", fail)
    monkeypatch.setattr(ev, "build_cache", fail)
    second = ev.evaluate(model, None, s, tmp_path, window_ids=windows(), progress=False)
    assert sorted(r["key"] for r in second) == sorted(r["key"] for r in first)
    assert (tmp_path / ev.RESULTS_FILE).read_text().splitlines() == lines


def test_resume_computes_only_new_cells_and_survives_a_torn_line(model, tmp_path):
    ev.evaluate(model, None, settings(), tmp_path, window_ids=windows(), progress=False)
    with (tmp_path / ev.RESULTS_FILE).open("a") as f:
        f.write('{"key": "half a line')  # a run killed mid-write
    recs = ev.evaluate(model, None, settings(budgets=(2.5, 4.0)), tmp_path, window_ids=windows(), progress=False)
    assert len(recs) == 2 * 2 * 3
    keys = [json.loads(l)["key"] for l in (tmp_path / ev.RESULTS_FILE).read_text().splitlines() if l.startswith('{"key": "[')]
    assert len(keys) == len(set(keys)) == 12


def test_reports_are_written(model, tmp_path):
    s = settings(methods=("full", "rdkv", "uniform-2", "snapkv"), budgets=(1.5, 4.0))
    recs = ev.evaluate(model, None, s, tmp_path, window_ids=windows(), progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["cells"]) == len(recs) == 2 * 2 * (1 + 2 + 1 + 2)
    cell = data["cells"][0]
    for field in ("model", "task", "method", "budget", "length", "seed", "nbytes", "pct_bf16", "value"):
        assert field in cell
    table = (tmp_path / "table.md").read_text()
    for label in ("full cache", "RDKV", "uniform KIVI-2", "SnapKV", "At matched bytes"):
        assert label in table
    png = (tmp_path / "rate_distortion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_ruler_cells_score_greedy_answers(tmp_path):
    from rdkv_hf.eval import tasks

    tok = tiny_tokenizer([tasks.NOISE] * 20, chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    model = tiny_model("llama", vocab_size=len(tok))
    s = ev.EvalSettings("tiny", tasks=("ruler",), methods=("full", "rdkv"), budgets=(2.5,), lengths=(400,),
                        ruler_tasks=("niah_single",))
    recs = ev.evaluate(model, tok, s, tmp_path, progress=False)
    assert {(r["task"], r["method"]) for r in recs} == {("ruler/niah_single", "full"), ("ruler/niah_single", "rdkv")}
    for r in recs:
        assert r["value"] in (0.0, 1.0) and 0 < r["new_tokens"] <= 24 and abs(r["prompt_tokens"] - 400) <= 12
    assert "RULER-style tasks" in (tmp_path / "table.md").read_text()


def test_ruler_cells_with_observe_count_the_packed_prompt(tmp_path):
    """`rdkv:observe=4` packs the prompt during the answer: its cells record the packed prompt's bytes
    (the answer's own tokens left out), near plain RDKV's at the same budget, not the full cache's.
    With `observe=100` the answer ends first: the report says that score read the whole prompt."""
    from rdkv_hf.eval import tasks

    tok = tiny_tokenizer([tasks.NOISE] * 20, chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    model = tiny_model("llama", vocab_size=len(tok))
    model.generation_config.eos_token_id = None
    s = ev.EvalSettings("tiny", tasks=("ruler",), methods=("full", "rdkv", "rdkv:observe=4", "rdkv:observe=100"), budgets=(2.5,),
                        lengths=(400,), ruler_tasks=("niah_single",))
    recs = {r["method"]: r for r in ev.evaluate(model, tok, s, tmp_path, progress=False)}
    assert 4 < recs["rdkv:observe=4"]["new_tokens"] < 100
    plain, waited = recs["rdkv"]["nbytes"], recs["rdkv:observe=4"]["nbytes"]
    assert abs(waited - plain) < 0.05 * plain and waited < recs["full"]["nbytes"] / 4
    assert [recs[m]["prompt_unpacked"] for m in ("rdkv", "rdkv:observe=4", "rdkv:observe=100")] == [False, False, True]
    note = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("**Not all measured packed")]
    assert len(note) == 1 and re.search(r"RDKV \[observe=100\] at 2.5: (\d+) of \1 answers ended before the prompt was packed", note[0])
    assert "observe=4" not in note[0]


# --- methods registry and errors ---------------------------------------------------------------


def test_methods_registry_builds_every_method_below_full_bytes(model, profile):
    assert list(ev.all_methods()) == ["full", "rdkv", "rdkv+profile", "ratequant", "uniform-2", "uniform-4",
                                      "quanto-2", "quanto-4", "snapkv", "adakv", "streamingllm", "random"]
    assert {m.name for m in ev.all_methods().values() if m.kind == "eviction"} == {n for n, c in modes().items() if c.evicts_only}
    pre = ev.prefill(model, windows(1)[0][:, :PROMPT])
    for name, method in ev.all_methods().items():
        cache = ev.build_cache(model, pre, method, tiny_budget(method), profile)
        nbytes = ev.cache_nbytes(cache)
        if name == "full":
            assert nbytes == 2 * pre.bf16_bytes  # float32
        else:
            assert 0 < nbytes < pre.bf16_bytes / 2, name


def test_bad_method_names_list_the_valid_ones(capsys):
    with pytest.raises(ValueError, match=r"unknown method 'kivi'; valid methods: full, rdkv, rdkv\+profile"):
        ev.parse_method("kivi")
    with pytest.raises(ValueError, match=r"bad option 'colour=red' for method 'snapkv'.*window"):
        ev.parse_method("snapkv:colour=red")
    spec = "rdkv:widths=0/4/16:window=64"
    assert ev.parse_method(spec).spec == spec and dict(ev.parse_method(spec).options)["widths"] == (0, 4, 16)
    with pytest.raises(ValueError, match="valid tasks: ppl, ruler, distortion"):
        ev.EvalSettings("tiny", tasks=("mmlu",))
    with pytest.raises(ValueError, match="valid ones: niah_single"):
        ev.EvalSettings("tiny", ruler_tasks=("qa",))
    # The CLI refuses before it loads any model, in one line.
    assert main(["eval", "--methods", "rdkv,nope"]) == 1
    err = capsys.readouterr().err
    assert "valid methods" in err and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match="valid methods"):
        main(["--debug", "eval", "--methods", "rdkv,nope"])


def test_profile_methods_are_skipped_without_a_profile(model, tmp_path, caplog):
    s = settings(methods=("full", "ratequant"), tasks=("ppl",))
    recs = ev.evaluate(model, None, s, tmp_path, window_ids=windows(), progress=False)
    assert {r["method"] for r in recs} == {"full"}
    assert "skipping ratequant" in caplog.text
    assert "Skipped: ratequant (no profile)" in (tmp_path / "table.md").read_text()


def test_a_patched_model_is_refused(model, tmp_path):
    rdkv_hf.patch(model, budget=2.5)
    try:
        with pytest.raises(ValueError, match="unpatch"):
            ev.evaluate(model, None, settings(), tmp_path, window_ids=windows(), progress=False)
    finally:
        rdkv_hf.unpatch(model)


def test_variant_options_protect_tokens_and_floor_head_budgets(profile):
    g = torch.Generator().manual_seed(0)
    w_tok, w_ch = torch.rand(1, 2, 40, generator=g) ** 8, torch.rand(1, 2, 16, generator=g)
    real = torch.ones(1, 40, dtype=torch.bool)
    plain = ev.method_planner(ev.parse_method("rdkv"), 2.0).widths(0, w_tok, w_ch, real)[0]
    v_bits = ev.method_planner(ev.parse_method("rdkv:sinks=2:recent=3"), 2.0).widths(0, w_tok, w_ch, real)[0]
    assert (v_bits[..., :2] == 16).all() and (v_bits[..., -3:] == 16).all()
    assert not (plain[..., :2] == 16).all()  # the protection is what kept them
    # head_floor is an RDKVConfig knob passed through the method spec (0: the profile's allocation as is).
    base = ev.method_planner(ev.parse_method("rdkv+profile:head_floor=0"), 1.0, profile)
    floored = ev.method_planner(ev.parse_method("rdkv+profile:head_floor=0.5"), 1.0, profile)
    assert base.config.head_floor == 0.0 and floored.config.head_floor == 0.5
    both, ref = torch.stack([floored.k_bits, floored.v_bits]), torch.stack([base.k_bits, base.v_bits]).double()
    assert both.min() >= 0.5 - 1e-9 and both.mean() == pytest.approx(ref.mean())
    assert ev.method_planner(ev.parse_method("rdkv+profile"), 1.0, profile).config.head_floor == 0.25
    with pytest.raises(ValueError, match="rdkv\\+profile"):
        ev.method_planner(ev.parse_method("rdkv:head_floor=0.5"), 1.0)


@pytest.mark.library_defaults
def test_the_harness_packs_the_prompt_at_its_forward_unless_a_method_says_observe():
    """The library's default `observe` (16) would let a short answer read the prompt in full precision:
    the harness's RDKV methods pack at the prompt's forward, `rdkv:observe=k` waits k steps."""
    assert ev.method_planner(ev.parse_method("rdkv"), 2.5).config.waits_for == 0
    assert ev.method_planner(ev.parse_method("snapkv"), 2.5).config.waits_for == 0
    assert ev.method_planner(ev.parse_method("rdkv:observe=16"), 2.5).config.waits_for == 16
