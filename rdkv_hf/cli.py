"""The `rdkv-hf` command (also `python -m rdkv_hf`)."""

from __future__ import annotations

import argparse
import logging
import sys


def _demo(args) -> int:
    from .demo import run_demo

    runs = run_demo(args.model, budget=args.budget, context=args.context, seed=args.seed,
                    profile=None if args.no_profile else (args.profile or "default"), threads=args.threads)
    return 0 if all(r.text for r in runs) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdkv-hf", description="RDKV KV-cache compression for HuggingFace Transformers")
    p.add_argument("-v", "--verbose", action="store_true", help="log what rdkv_hf does")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="recall a fact from a long prompt with the full cache and with RDKV")
    d.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or gemma3-270m")
    d.add_argument("--budget", type=float, default=2.5, help="bits per cached K/V element (default 2.5)")
    d.add_argument("--context", type=int, default=2500, help="prompt tokens (default 2500)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--profile", default=None, help="profile dir or Hub id (default: the shipped one, if any)")
    d.add_argument("--no-profile", action="store_true", help="plain RDKV, equal head budgets")
    d.add_argument("--threads", type=int, default=None, help="torch threads")
    d.set_defaults(func=_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
