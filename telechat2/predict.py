"""`telechat2 predict`: generate for a raw prompt, or chat interactively; plus `load_model`, reused by the server.

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
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from telechat2.configuration import TeleChat2Config
from telechat2.generation import GenerationConfig

# model_config keys of the seed's YAML that carry generation defaults -> GenerationConfig fields
_YAML_GENERATION_KEYS = {
    "do_sample": "do_sample",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_new_tokens",
}
_MODEL_PREFIXES = ("model.", "lm_head.")  # checkpoint keys that belong to the network (the rest: optimizer state)


# -- configuration ----------------------------------------------------------------------------------------------------


def read_run_config(config: str) -> dict[str, Any]:
    """The YAML mapping at path `config`, or the rendered predict config of the model named `config`."""
    from telechat2 import configs  # no MindSpore import

    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"--config {config}: no such YAML file")
        document = configs.load_yaml_with_bases(path)  # resolves base_config like MindFormers
        if not isinstance((document.get("model") or {}).get("model_config"), dict):
            raise ValueError(f"--config {config}: a MindFormers YAML needs a model.model_config mapping")
        return document
    return configs.load_config(config, "predict")


def architecture_from(run_config: dict[str, Any], seq_length: int | None = None) -> TeleChat2Config:
    """TeleChat2Config from a run config's model.model_config, optionally with another seq_length."""
    model_config = {k: v for k, v in run_config["model"]["model_config"].items() if k != "type"}
    arch = TeleChat2Config.from_model_config(model_config)
    return dataclasses.replace(arch, seq_length=seq_length) if seq_length else arch


# -- model loading ----------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A .ckpt file, or the newest .ckpt in a directory (rank_0/ first, as finetune and merge write them)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        search_dir = path / "rank_0" if (path / "rank_0").is_dir() else path
        candidates = sorted(search_dir.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
        if candidates:
            return candidates[-1]
        raise FileNotFoundError(f"checkpoint directory {path} holds no .ckpt file")
    raise FileNotFoundError(f"checkpoint {path} does not exist")


def check_checkpoint_matches(
    path: Path, saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> None:
    """Refuse a checkpoint whose model parameters (names and shapes) are not exactly the model's, naming them all."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(n for n in saved if n.startswith(_MODEL_PREFIXES) and n not in expected)
    mis_shaped = [
        f"{name} {saved[name]} != {shape}" for name, shape in expected.items() if name in saved and saved[name] != shape
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if any("w_qkv" in name for name in missing + unexpected):
        problems.append("the attention layouts differ: set model_config.qkv_concat to the checkpoint's layout")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model: " + "; ".join(problems))


def load_checkpoint_into(model, checkpoint: str | Path) -> Path:
    """Load a full checkpoint into `model`, refusing missing, unknown or mis-shaped parameters (all named)."""
    import mindspore as ms

    path = resolve_checkpoint(checkpoint)
    try:
        saved = ms.load_checkpoint(str(path))
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError for corrupt files
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    expected = dict(model.parameters_and_names())
    check_checkpoint_matches(
        path, {n: tuple(t.shape) for n, t in saved.items()}, {n: tuple(p.shape) for n, p in expected.items()}
    )
    params = {name: _as_dtype(saved[name], param.dtype, name) for name, param in expected.items()}
    not_loaded, _ = ms.load_param_into_net(model, params, strict_load=True)
    if not_loaded:
        raise ValueError(f"checkpoint {path}: parameters not loaded: {', '.join(not_loaded)}")
    return path


def _as_dtype(value, dtype, name: str):
    """A bfloat16/float16 checkpoint loads into a float32 model (and back): cast instead of failing."""
    import mindspore as ms

    return value if value.dtype == dtype else ms.Parameter(value.astype(dtype), name=name)


def load_model(config: str, checkpoint: str | None, seq_length: int | None = None, tensor_parallel=None):
    """Build TeleChat2ForCausalLM from a YAML path or model name and load `checkpoint` (None = random weights).

    Switches MindSpore to PyNative mode (generation feeds a new shape each step). Off Ascend, the fused Ascend
    kernels are turned off and the compute dtype is float32, whatever the YAML asks (bfloat16 is an NPU choice).
    With `tensor_parallel` (a `telechat2.tensor_parallel.TensorParallel` of size > 1, under msrun) this rank builds
    its share of the model and reads only its slices of the full checkpoint.
    """
    import mindspore as ms

    from telechat2.modeling import TeleChat2ForCausalLM

    ms.set_context(mode=ms.PYNATIVE_MODE)
    arch = architecture_from(read_run_config(config), seq_length)
    if ms.get_context("device_target") != "Ascend":
        arch = dataclasses.replace(arch, use_flash_attention=False, use_fused_rms_norm=False, compute_dtype="float32")
    if tensor_parallel is not None and tensor_parallel.size > 1:
        from telechat2 import tensor_parallel as tp

        return tp.load_model(arch, checkpoint, tensor_parallel)
    model = TeleChat2ForCausalLM(arch)
    if checkpoint:
        load_checkpoint_into(model, checkpoint)
    model.set_train(False)
    return model


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

    from telechat2.serve import distributed

    if distributed.is_msrun_scheduler(os.environ):
        return distributed.run_msrun_scheduler()
    group = distributed.ProcessGroup.from_env(os.environ)
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
        layout = distributed.plan_layout(run_config, group)
        tokenizer = TeleChat2Tokenizer(_vocab_file(args, run_config))
        gen_config = generation_config_from(args, run_config, tokenizer)
        place = distributed.join_cluster(group) if group.msrun_worker or layout == distributed.TENSOR_PARALLEL else None
        tensor_parallel = place if layout == distributed.TENSOR_PARALLEL else None
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
