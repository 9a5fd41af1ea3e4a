"""`telechat2 predict`: generate for a raw prompt, or chat interactively (model loading: `telechat2.loading`).

    telechat2 predict --config telechat2-7b --load_checkpoint telechat2_7b.ckpt --vocab_file tokenizer.model \\
        --predict_data "<_start><_user>生抽与老抽的区别？<_bot>"

`--config` is a MindFormers YAML (its `model.model_config` is the architecture; its generation keys and
`processor.tokenizer.vocab_file` are used as defaults) or a model name known to `telechat2.configs`. Flags take
the seed's underscore names and hyphenated forms. Settings resolve as: flag, then YAML, then TeleChat2's defaults.
Under msrun with `parallel_config.model_parallel` equal to the number of ranks, the model is split over the ranks
(`telechat2.tensor_parallel`), as the seed's `--use_parallel True` runs do.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from telechat2.generation import GenerationConfig
from telechat2.loading import load_model, read_run_config

# model_config keys of the seed's YAML that carry generation defaults -> GenerationConfig fields
_YAML_GENERATION_KEYS = {
    "do_sample": "do_sample",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_new_tokens",
}


# -- command line -----------------------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add --a_b with its hyphenated twin --a-b."""
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **kwargs)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    _add(parser, "config", required=True, help="MindFormers YAML path or model name (e.g. telechat2-7b)")
    _add(parser, "load_checkpoint", help="full .ckpt file, or a directory holding one (random weights if omitted)")
    _add(parser, "vocab_file", help="sentencepiece tokenizer.model (default: processor.tokenizer.vocab_file)")
    _add(parser, "predict_data", action="append", help="raw prompt, e.g. '<_start><_user>hi<_bot>'; repeatable")
    _add(parser, "interactive", action="store_true", help="chat: read questions from stdin, keep the history")
    _add(parser, "system", help="system prompt for --interactive (default: TeleChat2's official one)")
    _add(
        parser,
        "no_default_system",
        action="store_true",
        help="--interactive without a system prompt when --system is not given",
    )
    _add(parser, "seq_length", type=int, help="longest sequence (prompt + answer); default from the config")
    _add(parser, "max_new_tokens", type=int, help="default 4096 (bounded by seq_length)")
    _add(parser, "do_sample", type=_bool, nargs="?", const=True, help="sample instead of greedy (default false)")
    _add(parser, "temperature", type=float, help="default 0.3")
    _add(parser, "top_k", type=int, help="default 5 (0 = off)")
    _add(parser, "top_p", type=float, help="default 0.85 (1 = off)")
    _add(parser, "repetition_penalty", type=float, help="default 1.03 (1 = off)")
    _add(parser, "seed", type=int, help="seed for sampling (reproducible output)")
    _add(parser, "stop", action="append", help="extra stop token: an id or a special piece such as <_user>")
    _add(
        parser,
        "use_parallel",
        type=_bool,
        default=False,
        help="seed flag: True under msrun (the ranks and parallel_config.model_parallel decide the split)",
    )
    _add(parser, "register_path", help="seed flag; ignored (the model is built in)")
    _add(parser, "auto_trans_ckpt", type=_bool, default=False, help="seed flag; ignored (load a merged checkpoint)")


def generation_config_from(args: argparse.Namespace, run_config: dict[str, Any], tokenizer) -> GenerationConfig:
    """Flags over YAML over TeleChat2 defaults; --stop adds to <_end>."""
    values: dict[str, Any] = {}
    model_config = run_config["model"]["model_config"]
    for yaml_key, field_name in _YAML_GENERATION_KEYS.items():
        if model_config.get(yaml_key) is not None:
            values[field_name] = model_config[yaml_key]
    for field_name in (*_YAML_GENERATION_KEYS.values(), "seed"):
        if getattr(args, field_name) is not None:
            values[field_name] = getattr(args, field_name)
    stop_ids = [tokenizer.eos_token_id]
    for stop in args.stop or []:
        stop_ids.append(int(stop) if stop.strip().isdigit() else _single_token(tokenizer, stop))
    return GenerationConfig(**values, stop_token_ids=tuple(stop_ids))


def _single_token(tokenizer, piece: str) -> int:
    if tokenizer.has_piece(piece):
        return tokenizer.piece_to_id(piece)
    ids = tokenizer.encode(piece)
    if len(ids) != 1:
        raise ValueError(f"--stop {piece!r} is {len(ids)} tokens; give a single token (an id or a piece)")
    return ids[0]


def _vocab_file(args: argparse.Namespace, run_config: dict[str, Any]) -> str:
    vocab = args.vocab_file or ((run_config.get("processor") or {}).get("tokenizer") or {}).get("vocab_file")
    if not vocab:
        raise ValueError("no tokenizer: pass --vocab_file or set processor.tokenizer.vocab_file in the YAML")
    return vocab


def _stream_text(tokenizer, tokens: Iterator[int], out: TextIO) -> str:
    """Print text as tokens arrive (decoding the whole answer each time keeps multi-byte characters intact)."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    text = tokenizer.decode(ids)
    out.write(text[len(shown) :] + "\n")
    out.flush()
    return text


def chat_loop(
    model,
    tokenizer,
    config: GenerationConfig,
    system: str | None,
    lines: TextIO,
    out: TextIO,
    default_system: bool = True,
) -> int:
    """Interactive chat: one question per line; `/reset` forgets the history; `exit`, `quit` or EOF end it.

    Without `system`, the official default system prompt is used unless `default_system` is False.
    """
    from telechat2.chat import DEFAULT_SYSTEM_PROMPT, chat_input_ids
    from telechat2.generation import stream_generate

    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    budget = model.architecture.seq_length - min(config.max_new_tokens, model.architecture.seq_length // 2)
    out.write("TeleChat2 chat: type a question; /reset clears the history, exit quits.\n")
    while True:
        out.write("user> ")
        out.flush()
        line = lines.readline()
        if not line or line.strip() in ("exit", "quit"):
            return 0
        question = line.strip()
        if not question:
            continue
        if question == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": question})
        default = DEFAULT_SYSTEM_PROMPT if default_system else None
        ids = chat_input_ids(tokenizer, messages, max_input_tokens=budget, default_system=default)
        out.write("bot> ")
        answer = _stream_text(tokenizer, stream_generate(model, ids, config), out)
        messages.append({"role": "assistant", "content": answer})


def run(args: argparse.Namespace) -> int:
    """One process, or every rank under msrun: with parallel_config.model_parallel equal to the number of ranks the
    model is split over them (`telechat2.tensor_parallel`); every rank generates in step and rank 0 prints."""
    import os

    from telechat2 import msrun

    if msrun.is_msrun_scheduler(os.environ):
        return msrun.run_msrun_scheduler()
    group = msrun.ProcessGroup.from_env(os.environ)
    if args.use_parallel and group.world_size == 1:
        print(
            "predict: --use_parallel True needs several ranks: start it under msrun with parallel_config."
            "model_parallel ranks, or drop the flag to run the merged checkpoint on one device",
            file=sys.stderr,
        )
        return 2
    if not args.interactive and not args.predict_data:
        print("predict: give --predict_data PROMPT or --interactive", file=sys.stderr)
        return 2
    if args.interactive and group.world_size > 1:
        print("predict: --interactive reads stdin in one process; under msrun use `telechat2 serve`", file=sys.stderr)
        return 2
    from telechat2.generation import stream_generate
    from telechat2.tokenizer import TeleChat2Tokenizer

    try:
        run_config = read_run_config(args.config)
        layout = msrun.plan_layout(run_config, group)
        tokenizer = TeleChat2Tokenizer(_vocab_file(args, run_config))
        gen_config = generation_config_from(args, run_config, tokenizer)
        place = msrun.join_cluster(group) if group.msrun_worker or layout == msrun.TENSOR_PARALLEL else None
        tensor_parallel = place if layout == msrun.TENSOR_PARALLEL else None
        if tensor_parallel is not None and gen_config.do_sample and gen_config.seed is None:
            from telechat2.tensor_parallel import shared_seed

            gen_config.seed = shared_seed()  # the ranks must draw the same tokens
        model = load_model(args.config, args.load_checkpoint, args.seq_length, tensor_parallel)
    except (OSError, ValueError, KeyError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 2
    if args.interactive:
        return chat_loop(
            model, tokenizer, gen_config, args.system, sys.stdin, sys.stdout, default_system=not args.no_default_system
        )
    out = sys.stdout if group.rank == 0 else open(os.devnull, "w")  # noqa: SIM115 (closed at exit)
    for prompt in args.predict_data:
        ids = tokenizer.encode(prompt)
        try:
            _stream_text(tokenizer, stream_generate(model, ids, gen_config), out)
        except ValueError as exc:
            print(f"predict: {exc}", file=sys.stderr)
            return 2
    return 0
