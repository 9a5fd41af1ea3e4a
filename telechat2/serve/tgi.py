"""TGI / MindIE dialect: POST /generate, POST /generate_stream, GET /info, GET /health.

What the seed's users call today (MindIE on port 1025). `inputs` is raw text fed to the model as is (control
tokens such as `<_start><_user>...<_bot>` written in it become their ids); chat templating is the OpenAI routes' job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from telechat2 import __version__
from telechat2.serve.runtime import GenerationRun, ServerState, TokenEvent, resolve_seed, run_unless_disconnected
from telechat2.serve.schemas import GenerateRequest
from telechat2.serve.text import TextStream

log = logging.getLogger(__name__)


def token_json(event: TokenEvent) -> dict[str, Any]:
    # logprob: the generator yields ids only, so there is no log-probability to report (documented).
    return {"id": event.id, "text": event.text, "logprob": None, "special": event.special}


def tgi_event(payload: dict[str, Any]) -> bytes:
    """`data:{json}` with no space after the colon, byte for byte what TGI and MindIE send."""
    return f"data:{json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def build_router(
    state: ServerState, parse: Callable[..., Any], auth: Callable[..., Any], sse_ping: int | None = None
) -> APIRouter:
    router = APIRouter()

    async def start(body: GenerateRequest) -> tuple[GenerationRun, str]:
        """Validate against the limits, queue the job; returns the run and the text to prepend."""
        engine = state.engine()
        p = body.parameters
        input_ids = await state.encode(body.inputs)
        if p.truncate is not None:
            input_ids = input_ids[-p.truncate :]
        max_new = state.check_limits(len(input_ids), p.max_new_tokens, "inputs", "parameters.max_new_tokens")
        if p.typical_p is not None:
            log.debug("typical_p=%s accepted and ignored: the generator has no typical sampling", p.typical_p)
        params = resolve_seed(
            engine.defaults.replace(
                do_sample=p.do_sample,
                temperature=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                repetition_penalty=p.repetition_penalty,
                seed=p.seed,
                max_new_tokens=max_new,
            )
        )
        job = state.submit(input_ids, params)
        run = GenerationRun(state, job, TextStream(engine.tokenizer, p.stop, keep_stop=True), max_new)
        return run, body.inputs if p.return_full_text else ""

    def details(run: GenerationRun, tokens: list[dict[str, Any]] | None) -> dict[str, Any]:
        result: dict[str, Any] = {
            "finish_reason": run.finish_reason,
            "generated_tokens": len(run.token_ids),
            "seed": run.job.params.seed if run.job.params.do_sample else None,
        }
        if tokens is not None:
            result["prefill"] = []
            result["tokens"] = tokens
        return result

    async def sse(run: GenerationRun, prefix: str, with_tokens: bool) -> AsyncIterator[bytes]:
        """One event per token; the last one carries generated_text and details (TGI's stream shape)."""
        pending: dict[str, Any] | None = None
        try:
            async for event in run.events():
                if pending is not None:
                    yield tgi_event(pending)
                pending = {"index": len(run.seen), "token": token_json(event), "generated_text": None, "details": None}
            final = pending or {"index": 0, "token": None}
            final["generated_text"] = prefix + run.text.text
            final["details"] = details(run, [token_json(e) for e in run.seen] if with_tokens else None)
            yield tgi_event(final)
        except Exception as exc:
            log.exception("streaming generation failed")
            if pending is not None:
                yield tgi_event(pending)
            yield tgi_event({"error": str(exc), "error_type": "generation"})
        finally:
            run.job.cancel("client disconnected")  # no-op when finished; stops generation if the client left

    async def respond(request: Request, body: GenerateRequest, stream: bool) -> Response:
        run, prefix = await start(body)
        if stream:
            return EventSourceResponse(sse(run, prefix, body.parameters.details), sep="\n", ping=sse_ping)
        if not await run_unless_disconnected(request, run):
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        tokens = [token_json(event) for event in run.seen] if body.parameters.details else None
        return JSONResponse({"generated_text": prefix + run.text.text, "details": details(run, tokens)})

    @router.post("/generate", dependencies=[Depends(auth)])
    async def generate(request: Request) -> Response:
        body = await parse(request, GenerateRequest)
        return await respond(request, body, stream=body.stream)

    @router.post("/generate_stream", dependencies=[Depends(auth)])
    async def generate_stream(request: Request) -> Response:
        body = await parse(request, GenerateRequest)
        return await respond(request, body, stream=True)

    @router.get("/info", dependencies=[Depends(auth)])
    async def info() -> dict[str, Any]:
        s = state.settings
        return {
            "model_id": s.model_name,
            "max_input_tokens": s.max_input_token_len,
            "max_total_tokens": s.max_seq_len,
            "max_concurrent_requests": s.max_queue + s.max_batch_size,
            "max_batch_size": s.max_batch_size,
            "router": "telechat2-serve",
            "version": __version__,
        }

    @router.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.ready else 503)

    return router
