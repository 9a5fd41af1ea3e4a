"""TeleChat2 chat formatting: OpenAI-style messages -> the prompt text or ids the model was trained on.

Two forms, both from the facts file:
- text (MindFormers predict style, what `telechat2 predict` and MindIE send):
  `<_system>{system}\\n<_user>{q}<_bot>{a}<_end>\\n ... <_user>{q}<_bot>`;
- ids (Hugging Face style, what the server feeds the model): `[1] + per past turn ([4]+q+[5]+a+[2]) + [4]+q+[5]`,
  cut from the left to a token budget keeping whole turns where possible.

Tool calls are written `<tool_call>\\n{"name": .., "arguments": ..}\\n</tool_call>` inside the assistant turn; tool
results as a user turn `<_user><tool_response>\\n...\\n</tool_response>`. The tool list is described in the system
turn (our wording: TeleChat2's own tool prompt is not public for the larger models).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2

from telechat2.tokenizer import (
    BOS_ID,
    BOT,
    BOT_ID,
    END,
    EOS_ID,
    SYSTEM,
    SYSTEM_ID,
    TOOL_CALL,
    TOOL_CALL_END,
    TOOL_RESPONSE,
    TOOL_RESPONSE_END,
    USER,
    USER_ID,
)

if TYPE_CHECKING:
    from telechat2.tokenizer import TeleChat2Tokenizer

Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant", "tool")

TOOLS_PROMPT = (
    "You can call the following tools. Their signatures are given as JSON inside <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n"
    f'To call a tool, answer with:\n{TOOL_CALL}\n{{"name": <tool name>, "arguments": <JSON object>}}\n{TOOL_CALL_END}\n'
    f"Tool results come back inside {TOOL_RESPONSE}{TOOL_RESPONSE_END}."
)

# Text form. Inputs are already normalised by `_turns`: every turn is (role, text) with role user or assistant.
CHAT_TEMPLATE = (
    "{%- if system is not none %}" + SYSTEM + "{{ system }}\n{% endif -%}"
    "{%- for role, text in turns %}"
    "{%- if role == 'user' %}" + USER + "{{ text }}"
    "{%- else %}" + BOT + "{{ text }}" + END + "\n{% endif -%}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}" + BOT + "{% endif %}"
)
_template = jinja2.Environment(autoescape=False, keep_trailing_newline=True).from_string(CHAT_TEMPLATE)


def _content_text(message: Message, index: int) -> str:
    """`content` as text: a string, None (tool-call-only turns) or OpenAI content parts of type text."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content: only text parts are supported, got {part!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"messages[{index}].content must be a string, a list of text parts or null")


def format_tool_call(call: Mapping[str, Any]) -> str:
    """One OpenAI tool call ({"function": {"name", "arguments"}} or {"name", "arguments"}) as TeleChat2 text."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # not JSON: keep the caller's string as is
            arguments = json.loads(arguments) if arguments.strip() else {}
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL}\n{body}\n{TOOL_CALL_END}"


def format_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tool list as it appears in the system turn."""
    described = [tool.get("function", tool) if tool.get("type", "function") == "function" else tool for tool in tools]
    listing = "\n".join(json.dumps(tool, ensure_ascii=False, sort_keys=True) for tool in described)
    return TOOLS_PROMPT.replace("{tools}", listing)


@dataclass(frozen=True)
class Conversation:
    """Messages normalised to a system text and alternating-or-not (role, text) turns, role user|assistant."""

    system: str | None
    turns: tuple[tuple[str, str], ...]


def normalise(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> Conversation:
    """Validate OpenAI-style messages and reduce them to TeleChat2 turns (tool results become user turns)."""
    system_parts: list[str] = []
    turns: list[tuple[str, str]] = []
    pending_tool_results: list[str] = []

    def flush_tool_results() -> None:
        if pending_tool_results:
            turns.append(("user", "\n".join(pending_tool_results)))
            pending_tool_results.clear()

    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
        text = _content_text(message, index)
        if role == "tool":
            pending_tool_results.append(f"{TOOL_RESPONSE}\n{text}\n{TOOL_RESPONSE_END}")
            continue
        flush_tool_results()
        if role == "system":
            if turns:
                raise ValueError(f"messages[{index}]: a system message must come before the conversation")
            system_parts.append(text)
        elif role == "user":
            turns.append(("user", text))
        else:
            calls = [format_tool_call(call) for call in message.get("tool_calls") or ()]
            turns.append(("assistant", "\n".join([text, *calls] if text else calls)))
    flush_tool_results()
    if tools:
        system_parts.append(format_tools(tools))
    system = "\n\n".join(part for part in system_parts if part) if system_parts else None
    return Conversation(system=system, turns=tuple(turns))


def format_chat(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Prompt text in MindFormers predict style (no `<_start>`: callers add it, as the seed's raw prompts do)."""
    conversation = normalise(messages, tools)
    return _template.render(
        system=conversation.system, turns=conversation.turns, add_generation_prompt=add_generation_prompt
    )


def chat_input_ids(
    tokenizer: TeleChat2Tokenizer,
    messages: Sequence[Message],
    max_input_tokens: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Hugging Face style ids: [1] + system + past turns ([4]+q+[5]+a+[2]) + [4]+q + [5].

    Over `max_input_tokens`, the oldest whole turns are dropped first (the system prompt is kept); if the last
    question alone is still too long, the sequence is cut from the left, keeping `<_start>` first.
    """
    conversation = normalise(messages, tools)
    if not conversation.turns or conversation.turns[-1][0] != "user":
        raise ValueError("the last message must be from the user (or a tool result) to prompt the model")
    if max_input_tokens is not None and max_input_tokens < 3:
        raise ValueError(f"max_input_tokens must be at least 3 (<_start><_user>...<_bot>), got {max_input_tokens}")
    prefix = [BOS_ID]
    if conversation.system is not None:
        prefix += [SYSTEM_ID, *tokenizer.encode(conversation.system + "\n")]
    # Group into turns that start at a user message, so truncation never separates a question from its answer.
    groups: list[list[int]] = []
    for role, text in conversation.turns:
        ids = tokenizer.encode(text)
        if role == "user":
            groups.append([USER_ID, *ids])
        else:
            if not groups:
                groups.append([])
            groups[-1] += [BOT_ID, *ids, EOS_ID]
    groups[-1].append(BOT_ID)
    if max_input_tokens is None:
        return prefix + [token for group in groups for token in group]
    total = len(prefix) + sum(map(len, groups))
    while len(groups) > 1 and total > max_input_tokens:
        total -= len(groups.pop(0))
    if total <= max_input_tokens:
        return prefix + [token for group in groups for token in group]
    # Only the last question is left and it does not fit: keep `<_start><_user>`, drop text from the left.
    question = groups[0]
    body = prefix[1:] + question[1:]
    return [BOS_ID, USER_ID, *body[len(body) - (max_input_tokens - 2) :]]


_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_END), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split generated assistant text into its plain content and OpenAI-style tool calls.

    A block whose body is not a JSON object with a "name" is left in the content untouched.
    """
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return match.group(0)
        arguments = body.get("arguments", {})
        calls.append(
            {
                "id": f"call_{len(calls)}",
                "type": "function",
                "function": {
                    "name": body["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
        return ""

    content = _TOOL_CALL_RE.sub(take, text)
    return content.strip() if calls else content, calls
