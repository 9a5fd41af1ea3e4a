"""`telechat2 <subcommand>`: one command line for every phase of the model's life.

Each subcommand lives in its own module, imported only when that subcommand runs, so `telechat2 describe`
and `telechat2 launch` start without importing MindSpore. A module exposes `configure_parser(parser)` and
`run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Order is the order of a model's life.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "describe": ("telechat2.describe", "architecture, exact parameter count and memory per device of a model"),
    "preprocess": ("telechat2.preprocess", "turn a jsonl chat dataset into packed MindRecord for finetuning"),
    "convert": ("telechat2.convert", "convert Hugging Face (torch) weights to a MindSpore checkpoint"),
    "convert-reversed": ("telechat2.convert_reversed", "convert a MindSpore checkpoint back to Hugging Face weights"),
    "finetune": ("telechat2.finetune", "finetune (or resume) from a rendered MindFormers YAML"),
    "predict": ("telechat2.predict", "generate text for a prompt, or chat interactively"),
    "merge": ("telechat2.merge", "merge distributed checkpoint shards into one full checkpoint"),
    "launch": ("telechat2.launch", "pod entrypoint: resolve the master, then run msrun with join=True"),
    "serve": ("telechat2.serve.app", "HTTP server: TGI/MindIE /generate and OpenAI chat completions"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only the chosen subcommand's module is imported."""
    parser = argparse.ArgumentParser(prog="telechat2", description="TeleChat2 on MindSpore")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module_name).configure_parser(sub)
            sub.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
