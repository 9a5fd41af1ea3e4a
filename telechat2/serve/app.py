"""`telechat2 serve`: the app factory and the command line.

The port opens first and the model loads in the background: `/v2/health/live` answers at once, `/v2/health/ready`
turns 200 only when the weights are in (Kubernetes readiness), and if loading fails the server exits non-zero.
Business, management (health) and metrics endpoints share one port (MindIE splits them over 1025/1026/1027; one
port keeps the Service and probes simple). Bearer auth, when configured, guards the business routes only: health
and /metrics stay open for the kubelet and Prometheus.

Under msrun (several ranks) rank 0 alone serves HTTP and every rank runs each generation in lockstep (see
`telechat2.serve.distributed`). With `parallel_config.model_parallel` equal to the number of ranks the model is split
over them (tensor parallel, `telechat2.tensor_parallel`); with model_parallel 1 each rank holds a whole replica.
Without msrun, one process holds the whole model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from telechat2 import __version__
from telechat2.serve import openai_api, tgi
from telechat2.serve.auth import API_KEY_ENV, ApiKeySource
from telechat2.serve.engine import Engine
from telechat2.serve.metrics import MetricsMiddleware
from telechat2.serve.runtime import ServerState, ServeSettings
from telechat2.serve.schemas import ApiError

log = logging.getLogger(__name__)

DEFAULT_PORT = 1025  # MindIE's business port, what the seed's clients call
ModelT = TypeVar("ModelT", bound=BaseModel)
# Pydantic inserts union members and validator names into error locations; they are not field names.
_LOC_NOISE = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|function-.*|[A-Z]\w*)$")


def field_name(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not _LOC_NOISE.match(str(part)):
            name += f".{part}" if name else str(part)
    return name or "body"


def is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(request: Request, error: ApiError) -> JSONResponse:
    """OpenAI routes answer in OpenAI's error shape (the `openai` client reads it); the others in TGI's."""
    if is_openai(request):
        error_type = "invalid_request_error" if error.error_type in ("validation", "invalid_json") else error.error_type
        content: dict[str, Any] = {
            "error": {"message": error.message, "type": error_type, "param": error.field, "code": error.status}
        }
    else:
        content = {"error": error.message, "error_type": error.error_type, "field": error.field}
    return JSONResponse(content, status_code=error.status, headers=error.headers)


MAX_JSON_DEPTH = 32  # request bodies nest 4-5 levels; tools' JSON schemas a few more
MAX_INT_DIGITS = 4000  # below Python's int-conversion guard (4300): longer integers are refused, not a 500


class _HugeInt(str):
    """An integer literal too long to convert: kept as text, so validation names the field it sits in."""


def _parse_int(text: str) -> int | str:
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else _HugeInt(text)


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Path of the first container nested deeper than `limit` in parsed JSON (iterative: no recursion), or None."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > limit:
            return path or "body"
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))
    return None


def deep_path_in_text(text: str, limit: int = MAX_JSON_DEPTH) -> str:
    """Where raw JSON first nests deeper than `limit`, as a field path (for bodies too deep for `json.loads`)."""
    frames: list[list[Any]] = []  # per open container: its bracket and the current key (object) or index (array)
    index, size = 0, len(text)
    while index < size:
        char = text[index]
        if char == '"':
            end = index + 1
            while end < size and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            after = end + 1
            while after < size and text[after] in " \t\r\n":
                after += 1
            if frames and frames[-1][0] == "{" and after < size and text[after] == ":":
                frames[-1][1] = text[index + 1 : end]
            index = end + 1
            continue
        if char in "[{":
            if len(frames) >= limit:
                break
            frames.append([char, 0 if char == "[" else None])
        elif char in "]}" and frames:
            frames.pop()
        elif char == "," and frames and frames[-1][0] == "[":
            frames[-1][1] += 1
        index += 1
    return field_name(tuple(frame[1] for frame in frames if frame[1] is not None))


def _decode_json(raw: bytes) -> Any:
    """json.loads with bounded integers and depth; an ApiError (400) names what is wrong."""
    try:
        data = json.loads(raw, parse_int=_parse_int)
    except RecursionError:
        where = deep_path_in_text(raw.decode("utf-8", "replace"))
        raise ApiError(400, f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels", where) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"body: invalid JSON ({exc})", "body", error_type="invalid_json") from None
    where = too_deep(data)
    if where is not None:
        raise ApiError(400, f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels", where)
    return data


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes (header or bytes received)."""
    message = f"body: larger than the limit of {limit} bytes (--max-body-bytes)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, message, "body", error_type="payload_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, message, "body", error_type="payload_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def validate(raw: bytes, model: type[ModelT], openai: bool) -> ModelT:
    """Decode and validate a body (runs on a worker thread: a large body must not hold the event loop)."""
    data = _decode_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, "body: expected a JSON object", "body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = field_name(tuple(first["loc"]))
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unknown parameter ({UNKNOWN_PARAMETER_HINT})"
        elif isinstance(first.get("input"), _HugeInt):
            message = f"integer of {len(first['input'])} digits is too large"
        raise ApiError(400 if openai else 422, f"{field}: {message}", field) from None


UNKNOWN_PARAMETER_HINT = "see GET /info or docs/serving-api.md for the parameters this server supports"


async def parse_body(request: Request, model: type[ModelT]) -> ModelT:
    """Read and validate a JSON body; invalid JSON is a 400, a schema violation a 422 (TGI) or 400 (OpenAI)."""
    state: ServerState = request.app.state.serve
    raw = await read_body(request, state.settings.max_body_bytes)
    return await asyncio.to_thread(validate, raw, model, is_openai(request))


def create_app(settings: ServeSettings, load_engine: Callable[[], Engine], sse_ping: int | None = None) -> FastAPI:
    """The ASGI app; `load_engine` runs on a background thread once the app starts."""
    state = ServerState(settings, load_engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="telechat2 serve", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.serve = state

    async def require_token(request: Request) -> None:
        if settings.api_key is not None and not settings.api_key.check(request.headers.get("authorization")):
            raise ApiError(
                401,
                "missing or wrong bearer token (Authorization: Bearer <key>)",
                "authorization",
                error_type="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        """A generation failure is still answered in the route's JSON dialect (and logged with its traceback)."""
        log.error("request %s failed", request.url.path, exc_info=exc)
        return error_response(request, ApiError(500, f"generation failed: {exc}", error_type="server_error"))

    app.include_router(tgi.build_router(state, parse_body, require_token, sse_ping))
    app.include_router(openai_api.build_router(state, parse_body, require_token, sse_ping))

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=503 if state.load_error else 200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if state.ready else 503)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        if name != settings.model_name:
            return Response(status_code=404)
        return Response(status_code=200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    # Around every route, so 401/422/503 answers are counted too.
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` under uvicorn on a thread (tests, benchmarks, notebooks); yields the base URL.

    port 0 picks a free port; the real one is read back from the bound socket.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(30)


# -- command line -----------------------------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="predict YAML file, or a model name (telechat2-7b, ...)")
    parser.add_argument(
        "--load_checkpoint",
        "--load-checkpoint",
        dest="load_checkpoint",
        help="checkpoint file or directory (default: the config's load_checkpoint)",
    )
    parser.add_argument(
        "--vocab_file",
        "--vocab-file",
        dest="vocab_file",
        help="TeleChat2 tokenizer.model (default: the YAML's processor.tokenizer.vocab_file)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port for the API, health and /metrics (default {DEFAULT_PORT}, MindIE's business port)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="prompt + generated tokens (maxSeqLen; default: the model's seq_length from --config)",
    )
    parser.add_argument(
        "--max-input-token-len",
        type=int,
        default=None,
        help="prompt tokens (maxInputTokenLen; default 3/4 of --max-seq-len)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting behind the running one; more get 503 + Retry-After"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=ServeSettings.max_batch_size,
        help="requests decoded together (maxBatchSize; each holds a KV-cache row of --max-seq-len positions; "
        f"default {ServeSettings.max_batch_size})",
    )
    parser.add_argument(
        "--warm-up",
        action="store_true",
        help="compile the decode batch's shapes (every batch bucket and prompt length bucket) before reporting ready, "
        "so no request waits for a compile (seconds per shape on CPU)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=ServeSettings.max_body_bytes,
        help=f"larger request bodies get 413 (default {ServeSettings.max_body_bytes})",
    )
    parser.add_argument(
        "--model-name", default=None, help="name in /v1/models and /v2/models/{name}/ready (default: from --config)"
    )
    parser.add_argument(
        "--api-key-file", default=None, help=f"file holding the bearer token (else env {API_KEY_ENV}; neither: no auth)"
    )
    parser.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="under msrun: rank 0's port for the other ranks (default --port + 1)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def default_model_name(config: str) -> str:
    """A model name as given (`telechat2-7b`), or from the YAML's file name (`predict_telechat2_7b.yaml`)."""
    path = Path(config)
    if path.suffix not in (".yaml", ".yml"):
        return config
    name = path.stem.removeprefix("predict").strip("_-").replace("_", "-")
    return name if name and name != "parallel" else "telechat2"


def model_seq_length(config: str) -> int:
    """The seq_length of the model `--config` names (its YAML's model_config, or the packaged config)."""
    from telechat2.loading import architecture_from, read_run_config

    return architecture_from(read_run_config(config)).seq_length


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Settings from the flags; --max-seq-len defaults to the model's seq_length (reading --config)."""
    max_seq_len = args.max_seq_len or model_seq_length(args.config)
    max_input = args.max_input_token_len or max_seq_len * 3 // 4
    model_name = args.model_name or default_model_name(args.config)
    return ServeSettings(
        model_name=model_name,
        max_seq_len=max_seq_len,
        max_input_token_len=max_input,
        max_queue=args.max_queue,
        api_key=ApiKeySource.from_args(args.api_key_file),
        max_batch_size=args.max_batch_size,
        max_body_bytes=args.max_body_bytes,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from telechat2 import msrun
    from telechat2.loading import read_run_config
    from telechat2.serve import distributed
    from telechat2.serve.engine import TeleChat2Engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if msrun.is_msrun_scheduler(os.environ):
        return msrun.run_msrun_scheduler()
    try:
        settings = settings_from_args(args)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2

    group = msrun.ProcessGroup.from_env(os.environ)
    try:
        run_config = read_run_config(args.config)
        layout = msrun.plan_layout(run_config, group)
        warning = msrun.layout_warning(run_config, group)
    except (OSError, ValueError) as exc:
        log.error("--config: %s", exc)
        return 2
    if warning:
        log.warning("%s", warning)

    def load() -> Engine:
        tensor_parallel = None
        if layout == msrun.TENSOR_PARALLEL or group.msrun_worker:
            place = msrun.join_cluster(group)
            tensor_parallel = place if layout == msrun.TENSOR_PARALLEL else None
        engine = TeleChat2Engine.load(
            args.config, args.load_checkpoint, args.vocab_file, settings.max_seq_len, tensor_parallel
        )
        if args.warm_up and settings.max_batch_size > 1:  # every rank, in the same order (collectives line up)
            engine.warm_up(settings.max_batch_size)
        return engine

    if layout == msrun.TENSOR_PARALLEL:
        log.info(
            "rank %d of %d: holding 1/%d of the model (tensor parallel)", group.rank, group.world_size, group.world_size
        )
    control_port = args.control_port or args.port + 1
    if group.world_size > 1 and group.rank != 0:
        return distributed.follow(load, group.leader_host, control_port)
    if group.world_size > 1:
        log.info("rank 0 of %d: serving HTTP; followers join on port %d", group.world_size, control_port)
        load = distributed.lead(load, group.world_size, control_port)
    app = create_app(settings, load)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    state: ServerState = app.state.serve

    def stop_on_failure() -> None:
        server.should_exit = True

    state.on_load_failure = stop_on_failure
    server.run()
    return 1 if state.load_error else 0
