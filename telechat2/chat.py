"""TeleChat2 chat formatting: OpenAI-style messages -> the prompt text and ids of the official chat template.

The official template is the `chat_template` of TeleChat2's tokenizer (Tele-AI/TeleChat2,
mindformers-telechat/research/telechat2/telechat_tokenizer.py; `run_telechat_predict.py` applies it and tokenizes
the text, add_bos_token false):

    <_system>{system}\n<_user>{q}<_bot>{a}<_end>\n<_user>{q}<_bot>

- no `<_start>`; a newline after every `<_end>`; without a system message the official default system prompt
  (`DEFAULT_SYSTEM_PROMPT`; pass `default_system=None` to leave the system turn out);
- with tools, the system text is followed by the official tool prompt (`TOOLS_PROMPT_HEAD`, each tool as JSON on
  its own line, `TOOLS_PROMPT_TAIL`) instead of the newline;
- an assistant tool call is `<tool_call>\n{"name": "..", "arguments": {..}}\n</tool_call>` right after its content,
  later calls on a new line; tool results are `<_user><tool_response>\n...\n</tool_response>`, consecutive ones
  in the same user turn joined by a newline.

The ids are the tokens of that text (control tokens as single ids), built turn by turn so an over-long
conversation loses its oldest whole turns first (the system prompt is kept while the last question fits).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from telechat2.tokenizer import (
    BOT,
    BOT_ID,
    END,
    SYSTEM,
    TOOL_CALL,
    TOOL_CALL_END,
    TOOL_RESPONSE,
    TOOL_RESPONSE_END,
    USER,
)

if TYPE_CHECKING:
    from telechat2.tokenizer import TeleChat2Tokenizer

Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant", "tool")

# The official template's texts (telechat_tokenizer.py chat_template, see the module docstring), verbatim.
DEFAULT_SYSTEM_PROMPT = (
    "你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）"
    "研发的人工智能助手。"
)
TOOLS_PROMPT_HEAD = (
    "\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,"
    "以下是可用工具详情：\n<tools>\n"
)
TOOLS_PROMPT_TAIL = (
    "</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。"
    '下方是一个调用模板：\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n'
)


def _tojson(value: Any) -> str:
    """The template's `tojson` filter as Hugging Face / MindFormers define it: json.dumps, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


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
    """One OpenAI tool call ({"function": {"name", "arguments"}} or {"name", "arguments"}) as TeleChat2 text.

    `arguments` given as a JSON string (OpenAI's form) is parsed first, so the model sees the JSON object the
    template writes for a dict; a string that is not JSON is kept as a JSON string.
    """
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):  # not JSON: keep the caller's string as is
            arguments = json.loads(arguments) if arguments.strip() else {}
    return f'{TOOL_CALL}\n{{"name": "{function.get("name")}", "arguments": {_tojson(arguments)}}}\n{TOOL_CALL_END}'


def format_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The official tool prompt that follows the system text: each tool, as given, as one JSON line."""
    return TOOLS_PROMPT_HEAD + "".join(_tojson(dict(tool)) + "\n" for tool in tools) + TOOLS_PROMPT_TAIL


@dataclass(frozen=True)
class Conversation:
    """Messages normalised to a system text (None = none given) and turns (role user|assistant, text)."""

    system: str | None
    turns: tuple[tuple[str, str], ...]


def normalise(messages: Sequence[Message]) -> Conversation:
    """Validate OpenAI-style messages and reduce them to TeleChat2 turns (tool results become user turns).

    Leading system messages are joined by a blank line (the official template reads only the first one).
    """
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
            turns.append(("assistant", text + "\n".join(calls)))
    flush_tool_results()
    system = "\n\n".join(system_parts) if system_parts else None
    return Conversation(system=system, turns=tuple(turns))


def _blocks(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    default_system: str | None,
) -> tuple[str, list[str]]:
    """(system block, one text per turn group): each group starts at a user turn and holds the answers after it.

    Every group starts with a control token, so tokenizing the blocks one by one gives the ids of the whole text.
    """
    conversation = normalise(messages)
    system = conversation.system if conversation.system is not None else default_system
    if tools:  # the tool prompt follows the system text in place of its newline
        head = SYSTEM + (system or "") + format_tools(tools)
    elif system is not None:
        head = SYSTEM + system + "\n"
    else:
        head = ""
    groups: list[str] = []
    for role, text in conversation.turns:
        if role == "user":
            groups.append(USER + text)
        else:
            if not groups:
                groups.append("")
            groups[-1] += BOT + text + END + "\n"
    if add_generation_prompt:
        if not groups:
            groups.append("")
        groups[-1] += BOT
    return head, groups


def format_chat(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    default_system: str | None = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """The prompt text of the official chat template (no `<_start>`); `default_system=None` drops the default
    system prompt when the messages carry none."""
    head, groups = _blocks(messages, tools, add_generation_prompt, default_system)
    return head + "".join(groups)


def chat_input_ids(
    tokenizer: TeleChat2Tokenizer,
    messages: Sequence[Message],
    max_input_tokens: int | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    default_system: str | None = DEFAULT_SYSTEM_PROMPT,
) -> list[int]:
    """Token ids of `format_chat(messages, tools)`, the official template's ids.

    Over `max_input_tokens`, the oldest whole turns are dropped first (the system prompt is kept); if the last
    question does not fit even so, the system prompt goes too and the question is cut from the left, keeping its
    leading `<_user>` and the final `<_bot>`.
    """
    conversation = normalise(messages)
    if not conversation.turns or conversation.turns[-1][0] != "user":
        raise ValueError("the last message must be from the user (or a tool result) to prompt the model")
    if max_input_tokens is not None and max_input_tokens < 3:
        raise ValueError(f"max_input_tokens must be at least 3 (<_user>...<_bot>), got {max_input_tokens}")
    head, texts = _blocks(messages, tools, True, default_system)
    prefix = tokenizer.encode(head)
    groups = tokenizer.encode_batch(texts)
    if max_input_tokens is None:
        return prefix + [token for group in groups for token in group]
    total = len(prefix) + sum(map(len, groups))
    while len(groups) > 1 and total > max_input_tokens:
        total -= len(groups.pop(0))
    if total <= max_input_tokens:
        return prefix + [token for group in groups for token in group]
    question = groups[0]  # [<_user>, ..., <_bot>]
    if len(question) <= max_input_tokens:
        return question
    keep = max_input_tokens - 2
    return [question[0], *question[len(question) - 1 - keep : -1], BOT_ID]


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
