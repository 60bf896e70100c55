"""The `rdkv-hf` command (also `python -m rdkv_hf`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import DEFAULT_BUDGET


def _demo(args) -> int:
    from .eval.demo import run_demo

    runs = run_demo(args.model, budget=args.budget, context=args.context, seed=args.seed,
                    profile=None if args.no_profile else (args.profile or "default"), threads=args.threads, dtype=args.dtype)
    return 0 if all(r.text for r in runs) else 1


def _csv(cast):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            return tuple(cast(x) for x in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {cast.__name__}, got {text!r}") from None

    return parse


def _eval(args) -> int:
    import torch

    from .eval.models import load_model, shipped_profile
    from .eval.runner import MODEL_DEFAULTS, QUICK, EvalSettings, evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    stream = args.tasks is not None and "stream" in args.tasks
    if stream:
        args.tasks = tuple(t for t in args.tasks if t != "stream")
    preset = {**MODEL_DEFAULTS.get(args.model, {}), **(QUICK if args.quick else {})}
    given = {k: getattr(args, k) for k in ("tasks", "methods", "budgets", "lengths", "samples", "windows",
                                           "ppl_length", "continuation", "ruler_tasks", "haystack", "seed")}
    settings = None if stream and not args.tasks else EvalSettings(args.model, **{**preset, **{k: v for k, v in given.items() if v is not None}})
    model, tokenizer = load_model(args.model)
    if args.no_profile:
        profile = None
    elif args.profile:
        from .profile import RDKVProfile

        profile = RDKVProfile.from_pretrained(args.profile)
    else:
        profile = shipped_profile(args.model)
    out = args.out or f"runs/eval-{args.model}"
    if settings is not None:
        evaluate(model, tokenizer, settings, out, profile=profile)
        print((Path(out) / "table.md").read_text(encoding="utf-8"))
        print(f"written to {out}/: results.jsonl (resumable), results.json, table.md, rate_distortion.png")
    if stream:
        _stream(args, model, tokenizer, profile, out)
    return 0


def _stream(args, model, tokenizer, profile, out) -> None:
    """The stream task: a long text through the decode path (``rdkv_hf.eval.stream``), the model in bf16."""
    import torch

    from .eval.stream import StreamSettings, evaluate_stream

    given = dict(methods=args.stream_methods, stream_tokens=args.stream_tokens, decode_block=args.decode_block,
                 cap_share=args.cap_share, samples=args.samples, seed=args.seed)
    settings = StreamSettings(args.model, **{k: v for k, v in given.items() if v is not None})
    evaluate_stream(model.to(torch.bfloat16), tokenizer, settings, out, profile=profile)
    print((Path(out) / "stream_table.md").read_text(encoding="utf-8"))
    print(f"written to {out}/: stream.jsonl (resumable), stream_table.md")


def _load(name_or_path: str, gguf_file: str | None = None):
    """A known short name (smollm2-135m, gemma3-270m) or a Transformers path / repo id."""
    from .eval.models import MODELS, load_model

    if name_or_path in MODELS:
        return load_model(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kw).eval(), AutoTokenizer.from_pretrained(name_or_path, **kw)


def _calibrate(args) -> int:
    import time

    from .calibration import calibrate
    from .profile_hub import check_destination

    check_destination(args.out)  # before the work, not after it
    model, tok = _load(args.model, args.gguf_file)
    t = time.perf_counter()
    profile = calibrate(model, tokenizer=tok, n_seqs=args.n_seqs, seq_len=args.seq_len, seed=args.seed,
                        model_id=args.model_id or args.model)
    print(f"calibrated in {time.perf_counter() - t:.1f} s")
    path = profile.save_pretrained(args.out, repo_id=args.push_to_hub)
    print(f"saved to {path}")
    if args.push_to_hub:
        profile.push_to_hub(args.push_to_hub, private=args.private)
        print(f"pushed to {args.push_to_hub}")
    print(profile.show(args.budget))
    return 0


def _profile_show(args) -> int:
    from .profile import RDKVProfile

    profile = RDKVProfile.from_pretrained(args.profile, local_files_only=args.offline)
    print(profile.show(args.budget, layers=args.layers))
    if args.png:
        print(f"heat map: {profile.plot(args.budget, args.png, layers=args.layers)}")
    return 0


def _patch_for_context(model, model_name: str, args) -> str:
    """Patch `model` for `compress`: the profile given, else the one shipped for a known model
    (plain RDKV when it cannot serve the budget), else plain RDKV. Returns a label."""
    from .patching import patch

    profile = None if args.no_profile else args.profile
    if profile is None and not args.no_profile:
        from .eval.models import shipped_profile_name

        shipped = shipped_profile_name(model_name)
        if shipped is not None and args.mode in (None, "rdkv+profile", "ratequant"):
            try:
                patch(model, budget=args.budget, profile=shipped, mode=args.mode, compress_followups=args.compress_questions)
                return f"{model.config.rdkv['mode']} at {args.budget:g} bits (profile {shipped})"
            except ValueError as err:
                print(f"(the shipped profile cannot serve {args.budget:g} bits: {err}; compressing with plain RDKV)")
    patch(model, budget=args.budget, profile=profile, mode=args.mode, compress_followups=args.compress_questions)
    return f"{model.config.rdkv['mode']} at {args.budget:g} bits" + (f" (profile {profile})" if profile else "")


def _compress(args) -> int:
    import time

    import torch

    from .context import context_prompt, prefill

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--input {str(path)!r} is empty; give the document to compress")
    model, tok = _load(args.model, args.gguf_file)
    label = _patch_for_context(model, args.model, args)
    ids, template = context_prompt(tok, text, chat=False if args.raw else None)
    start = time.perf_counter()
    cache = prefill(model, torch.tensor([ids]), progress=True)
    seconds = time.perf_counter() - start
    out = cache.save_pretrained(args.out, metadata={"model": args.model, "gguf_file": args.gguf_file, "question_template": template,
                                                    "source": path.name})
    on_disk = sum(f.stat().st_size for f in out.iterdir())
    bits = cache.summary().prompt_bits_per_element
    print(f"compressed {len(ids):,} tokens in {seconds:.1f} s with {label}: {bits:.2f} bits per element, "
          f"{on_disk / 2**20:.2f} MiB on disk -> {out}")
    print(f'ask it: rdkv-hf ask {out} "your question" ["another question" ...]')
    return 0


def _ask(args) -> int:
    import time

    import torch

    from .cache import RDKVCache
    from .cache_io import read_config
    from .context import ask, question_ids
    from .patching import patch

    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_config(args.dir).get("metadata", {})
    name = args.model or meta.get("model")
    if not name:
        raise ValueError(f"{args.dir} does not record its model (it was not saved by `rdkv-hf compress`); pass --model")
    template = meta.get("question_template")
    if not template:
        raise ValueError(f"{args.dir} does not record a question template (it was not saved by `rdkv-hf compress`)")
    model, tok = _load(name, args.gguf_file or meta.get("gguf_file"))
    patch(model)  # the loaded cache keeps the settings it was compressed with
    start = time.perf_counter()
    cache = RDKVCache.from_pretrained(args.dir, model)
    loaded = time.perf_counter() - start
    questions = [question_ids(tok, template, q) for q in args.questions]
    start = time.perf_counter()
    answers = ask(model, cache, questions, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    answered = time.perf_counter() - start
    for q, a in zip(args.questions, answers):
        print(f"Q: {q}\nA: {tok.decode(a, skip_special_tokens=True).strip()}\n")
    print(f"loaded a {cache.get_seq_length():,}-token context in {loaded:.2f} s ({cache.nbytes / 2**20:.2f} MiB); "
          f"answered {len(questions)} question(s) in {answered:.1f} s")
    return 0


def _info(args) -> int:
    from .compat import TRANSFORMERS_VERSION
    from .model_patches import support_table
    from .version import __version__

    if args.markdown:
        print(support_table())
        return 0
    import torch

    print(f"rdkv_hf {__version__}, transformers {TRANSFORMERS_VERSION}, torch {torch.__version__}")
    print(support_table(installed=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdkv-hf", description="RDKV KV-cache compression for HuggingFace Transformers")
    p.add_argument("-v", "--verbose", action="store_true", help="log what rdkv_hf does")
    p.add_argument("--debug", action="store_true", help="show the whole traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="recall a fact from a long prompt with the full cache and with RDKV")
    d.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or gemma3-270m")
    d.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help=f"bits per cached K/V element (default {DEFAULT_BUDGET:g})")
    d.add_argument("--context", type=int, default=2500, help="prompt tokens (default 2500)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--profile", default=None, help="profile dir or Hub id (default: the shipped one, if any)")
    d.add_argument("--no-profile", action="store_true", help="plain RDKV, equal head budgets")
    d.add_argument("--threads", type=int, default=None, help="torch threads")
    d.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="model dtype (auto: bfloat16 where the CPU has AVX-512 BF16 or AMX, else float32)")
    d.set_defaults(func=_demo)

    e = sub.add_parser("eval", help="quality per byte of RDKV and its peers (perplexity, RULER-style tasks, distortion)",
                       description="Evaluate every method at measured bytes; resumable (finished cells are kept in OUT/results.jsonl).")
    e.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or gemma3-270m")
    e.add_argument("--tasks", type=_csv(str), help="comma list of ppl, ruler, distortion, stream (default: all but stream; "
                   "stream: a long text through the decode path, see --stream-tokens)")
    e.add_argument("--methods", type=_csv(str), help="comma list of methods, each optionally with options name:key=value:key=value (default: all; "
                   "full, rdkv, rdkv+profile, ratequant, uniform-2, uniform-4, quanto-2, quanto-4, snapkv, adakv, streamingllm)")
    e.add_argument("--budgets", type=_csv(float), help="bits per element for the budgeted methods (default 1,1.5,2.5,4; gemma3-270m: 0.4,1.6,2.5)")
    e.add_argument("--lengths", type=_csv(int), help="RULER prompt lengths (default 1024,2048,3072; gemma3-270m: 4096,8192,16384)")
    e.add_argument("--samples", type=int, help="RULER samples per task and length (default 2)")
    e.add_argument("--windows", type=int, help="text windows for ppl/distortion (default 4; gemma3-270m: 2)")
    e.add_argument("--ppl-length", type=int, help="prompt tokens of a ppl window (default 2048; gemma3-270m: 8192)")
    e.add_argument("--continuation", type=int, help="continuation tokens scored (default 256)")
    e.add_argument("--ruler-tasks", type=_csv(str), help="RULER tasks (default niah_single,niah_multikey: the ones SmolLM2-135M answers with the full cache)")
    e.add_argument("--haystack", choices=("noise", "text"), help="RULER haystack (default noise; gemma3-270m: text)")
    e.add_argument("--seed", type=int, help="first seed of windows and samples (default 0)")
    e.add_argument("--profile", default=None, help="profile dir or name (default: the shipped one for the model, if any)")
    e.add_argument("--no-profile", action="store_true", help="skip the methods that need a profile")
    e.add_argument("--out", default=None, help="output directory (default runs/eval-MODEL)")
    e.add_argument("--quick", action="store_true", help="a small grid for a smoke run (a few minutes)")
    e.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster when the CPU is shared)")
    e.add_argument("--stream-tokens", type=int, help="stream task: tokens through the decode path (default 6144)")
    e.add_argument("--decode-block", type=int, help="stream task: decode_block of the RDKV methods (default 128)")
    e.add_argument("--cap-share", type=float, help="stream task: the cap, a share of the full cache's bf16 bytes (default 0.1)")
    e.add_argument("--stream-methods", type=_csv(str), help="stream task: comma list of full, rdkv, rdkv-cap, rdkv+profile, rdkv+profile-cap, "
                   "streamingllm-cap, snapkv-cap, random-cap, kivi2 (default: all)")
    e.set_defaults(func=_eval)

    c = sub.add_parser("calibrate", help="measure a RateQuant/RDKV profile of a model")
    c.add_argument("--model", required=True, help="smollm2-135m, gemma3-270m, or a Transformers path / repo id")
    c.add_argument("--gguf-file", default=None, help="GGUF file name inside --model, if it is one")
    c.add_argument("--out", required=True, help="folder to write the profile to (laid out as its Hub repo)")
    c.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload it to this Hub repo")
    c.add_argument("--private", action="store_true", help="make the pushed repo private")
    c.add_argument("--model-id", default=None, help="the model's Hub id to record in the profile")
    c.add_argument("--n-seqs", type=int, default=16)
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="budget of the table printed at the end")
    c.set_defaults(func=_calibrate)

    co = sub.add_parser("compress", help="compress a document once into a saved cache that `ask` answers questions from",
                        description="Run a document through the model once, compressed by RDKV, and save the packed cache.")
    co.add_argument("--model", required=True, help="smollm2-135m, gemma3-270m, or a Transformers path / repo id")
    co.add_argument("--gguf-file", default=None, help="GGUF file name inside --model, if it is one")
    co.add_argument("--input", required=True, help="the document (a UTF-8 text file)")
    co.add_argument("--out", required=True, help="folder to save the compressed cache to (a saved cache there is replaced)")
    co.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help=f"bits per cached K/V element (default {DEFAULT_BUDGET:g})")
    co.add_argument("--mode", default=None, help="rdkv, rdkv+profile (default with a profile), ratequant, uniform, ...")
    co.add_argument("--profile", default=None, help="profile dir or Hub id (default: the one shipped for the model, if any)")
    co.add_argument("--no-profile", action="store_true", help="plain RDKV, equal head budgets")
    co.add_argument("--raw", action="store_true", help="raw text, no chat template (default: the chat template when the tokenizer has one)")
    co.add_argument("--compress-questions", action="store_true",
                    help="compress each question's tokens too (saved in the cache's settings); by default they stay in full "
                         "precision: about half the time to first token, a few hundred KiB more per question")
    co.add_argument("--threads", type=int, default=None, help="torch threads")
    co.set_defaults(func=_compress)

    a = sub.add_parser("ask", help="answer questions from a cache saved by `compress` (one load, many questions)")
    a.add_argument("dir", help="the folder `rdkv-hf compress --out` wrote")
    a.add_argument("questions", nargs="+", metavar="question")
    a.add_argument("--model", default=None, help="the model (default: the one the cache was compressed with)")
    a.add_argument("--gguf-file", default=None, help="GGUF file name inside --model, if it is one")
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--batch-size", type=int, default=None, help="questions per generate() call (default: all at once)")
    a.add_argument("--threads", type=int, default=None, help="torch threads")
    a.set_defaults(func=_ask)

    i = sub.add_parser("info", help="the supported architectures: what RDKV compresses in each, and its limits")
    i.add_argument("--markdown", action="store_true", help="the README's support matrix, exactly (no versions)")
    i.set_defaults(func=_info)

    pr = sub.add_parser("profile", help="inspect profiles")
    prs = pr.add_subparsers(dest="profile_command", required=True)
    sh = prs.add_parser("show", help="table (and PNG heat map) of the bits per layer and head at a budget")
    sh.add_argument("profile", help="a profile folder, shipped name or Hub repo id")
    sh.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    sh.add_argument("--png", default=None, help="write a heat map of K and V bits here")
    sh.add_argument("--layers", type=_csv(int), default=None,
                    help="comma list of the layers sharing the budget (default: the ones the cache compresses, stored in the profile)")
    sh.add_argument("--offline", action="store_true", help="only use the local Hub cache")
    sh.set_defaults(func=_profile_show)
    return p


def main(argv=None) -> int:
    """Run a command; an error is one line on stderr and exit status 1 (the traceback with --debug)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"rdkv-hf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (every error becomes one line; --debug shows it whole)
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"rdkv-hf {args.command}: error: {message} (--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
