"""OpenAI dialect: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Chat messages go through TeleChat2's chat template (`telechat2.chat.chat_input_ids`, tools included); text
completions feed `prompt` as is. Sampling maps onto the generator's parameters:
- temperature 0 means greedy, any other temperature samples; omitted, the model's default (greedy) applies;
- presence/frequency penalties (additive in OpenAI) become the multiplicative repetition penalty
  2 ** ((presence + frequency) / 2), clamped to [0.5, 2]; an explicit `repetition_penalty` wins;
- n > 1 is refused (400 naming `n`): one generation thread, and greedy answers would all be equal.
Tool calls written by the model (`<tool_call>{json}</tool_call>`) come back as `message.tool_calls`; with tools and
`stream: true` the answer is generated fully first, then sent as chunks, so the calls can be parsed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from telechat2.chat import chat_input_ids, parse_tool_calls
from telechat2.serve.engine import SamplingParams
from telechat2.serve.runtime import GenerationRun, ServerState, resolve_seed, run_unless_disconnected
from telechat2.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, _OpenAISampling
from telechat2.serve.text import TextStream

log = logging.getLogger(__name__)

FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def repetition_penalty(body: _OpenAISampling) -> float | None:
    if body.repetition_penalty is not None:
        return body.repetition_penalty
    penalty = body.presence_penalty + body.frequency_penalty
    return 2 ** (max(-2.0, min(2.0, penalty)) / 2) if penalty else None


def sampling(defaults: SamplingParams, body: _OpenAISampling, max_new_tokens: int) -> SamplingParams:
    return resolve_seed(
        defaults.replace(
            do_sample=None if body.temperature is None else body.temperature > 0,
            temperature=body.temperature if body.temperature else None,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=repetition_penalty(body),
            seed=body.seed,
            max_new_tokens=max_new_tokens,
        )
    )


def build_router(
    state: ServerState, parse: Callable[..., Any], auth: Callable[..., Any], sse_ping: int | None = None
) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)])
    name = state.settings.model_name

    def check_common(body: _OpenAISampling) -> None:
        if body.model is not None and body.model != name:
            raise ApiError(
                404,
                f"model: {body.model!r} is not served here; this server serves {name!r}",
                "model",
                error_type="model_not_found",
            )
        if body.n != 1:
            raise ApiError(400, "n: only n=1 is supported (one completion per request)", "n")

    def start(
        input_ids: list[int], body: _OpenAISampling, max_tokens: int | None, input_field: str, max_field: str
    ) -> GenerationRun:
        engine = state.engine()
        max_new = state.check_limits(len(input_ids), max_tokens, input_field, max_field)
        job = state.submit(input_ids, sampling(engine.defaults, body, max_new))
        return GenerationRun(state, job, TextStream(engine.tokenizer, body.stop, keep_stop=False), max_new)

    def usage(run: GenerationRun) -> dict[str, int]:
        prompt, completion = len(run.job.input_ids), len(run.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse_response(chunks: AsyncIterator[dict[str, Any]], run: GenerationRun) -> EventSourceResponse:
        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                async for chunk in chunks:
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
                yield {"data": "[DONE]"}
            except Exception as exc:
                log.exception("streaming generation failed")
                yield {"data": json.dumps({"error": {"message": str(exc), "type": "server_error"}})}
            finally:
                run.job.cancel("client disconnected")  # no-op when finished

        return EventSourceResponse(events(), sep="\n", ping=sse_ping)

    # -- chat -------------------------------------------------------------------------------------------------------

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse(request, ChatCompletionRequest)
        check_common(body)
        engine = state.engine()
        messages = [m.for_template() for m in body.messages]
        try:  # templating and tokenizing a long conversation take time: off the event loop
            input_ids = await asyncio.to_thread(chat_input_ids, engine.tokenizer, messages, tools=body.tools)
        except ValueError as exc:
            raise ApiError(400, f"messages: {exc}", "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        max_field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        run = start(input_ids, body, max_tokens, "messages", max_field)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }

        def message_and_reason() -> tuple[dict[str, Any], str]:
            text = run.text.text
            content, calls = parse_tool_calls(text) if body.tools else (text, [])
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
                return message, "tool_calls"
            return message, FINISH_REASONS[run.finish_reason]

        if not body.stream:
            if not await run_unless_disconnected(request, run):
                return Response(status_code=499)
            message, reason = message_and_reason()
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": name,
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
                    "usage": usage(run),
                }
            )

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            yield chunk({"role": "assistant", "content": ""})
            if body.tools:  # whole answer first, so tool calls can be parsed
                await run.run()
                message, reason = message_and_reason()
                if message["content"]:
                    yield chunk({"content": message["content"]})
                for index, call in enumerate(message.get("tool_calls", [])):
                    yield chunk({"tool_calls": [{"index": index, **call}]})
            else:
                async for event in run.events():
                    if event.released:
                        yield chunk({"content": event.released})
                if run.tail:
                    yield chunk({"content": run.tail})
                reason = FINISH_REASONS[run.finish_reason]
            yield chunk({}, reason)
            if body.stream_options and body.stream_options.include_usage:
                yield {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "choices": [],
                    "usage": usage(run),
                }

        return sse_response(chunks(), run)

    # -- text completions -------------------------------------------------------------------------------------------

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        check_common(body)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, f"prompt: exactly one prompt is supported, got {len(body.prompt)}", "prompt")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        if not prompt:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        input_ids = await state.encode(prompt)
        run = start(input_ids, body, body.max_tokens, "prompt", "max_tokens")
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prefix = prompt if body.echo else ""

        def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            }

        if not body.stream:
            if not await run_unless_disconnected(request, run):
                return Response(status_code=499)
            result = chunk(prefix + run.text.text, FINISH_REASONS[run.finish_reason])
            return JSONResponse({**result, "usage": usage(run)})

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            if prefix:
                yield chunk(prefix)
            async for event in run.events():
                if event.released:
                    yield chunk(event.released)
            if run.tail:
                yield chunk(run.tail)
            yield chunk("", FINISH_REASONS[run.finish_reason])
            if body.stream_options and body.stream_options.include_usage:
                yield {**chunk(""), "choices": [], "usage": usage(run)}

        return sse_response(chunks(), run)

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "telechat2",
                    "max_model_len": state.settings.max_seq_len,
                }
            ],
        }

    return router
