"""Chat formatting: the text prompt and the Hugging Face style ids of the facts file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from telechat2 import chat
from telechat2 import tokenizer as tk

HISTORY = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "what is a model?"},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "weather of a city", "parameters": {"type": "object"}},
}


def test_single_turn_text() -> None:
    text = chat.format_chat([{"role": "user", "content": "生抽与老抽的区别？"}], default_system=None)
    assert text == "<_user>生抽与老抽的区别？<_bot>"
    with_default = chat.format_chat([{"role": "user", "content": "生抽与老抽的区别？"}])
    assert with_default == f"<_system>{chat.DEFAULT_SYSTEM_PROMPT}\n<_user>生抽与老抽的区别？<_bot>"


def test_multi_turn_with_system_text() -> None:
    text = chat.format_chat([{"role": "system", "content": "be brief"}, *HISTORY])
    assert text == "<_system>be brief\n<_user>hi<_bot>hello<_end>\n<_user>what is a model?<_bot>"


def test_no_generation_prompt_ends_after_the_answer() -> None:
    text = chat.format_chat(HISTORY[:2], add_generation_prompt=False, default_system=None)
    assert text == "<_user>hi<_bot>hello<_end>\n"


def test_tool_call_and_result_text() -> None:
    messages = [
        {"role": "user", "content": "weather in 北京?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = chat.format_chat(messages, tools=[WEATHER_TOOL])
    system, conversation = text.split("\n<_user>", 1)
    assert system.startswith("<_system>") and '"name": "get_weather"' in system
    assert system.endswith("</tool_call>\n")  # the official tool prompt's last line (then a blank line)
    assert conversation == (
        "weather in 北京?<_bot><tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "北京"}}\n'
        "</tool_call><_end>\n"
        "<_user><tool_response>\nsunny\n</tool_response><_bot>"
    )


def test_consecutive_tool_results_share_one_user_turn() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}}]},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "2"},
    ]
    text = chat.format_chat(messages)
    assert text.endswith("<_user><tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response><_bot>")
    assert text.count("<_user>") == 2


def test_content_parts_are_joined() -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    assert chat.format_chat([message], default_system=None) == "<_user>ab<_bot>"


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "late"}], r"messages\[1\]: a system"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
    ],
)
def test_bad_messages_name_the_field(messages, error) -> None:
    with pytest.raises(ValueError, match=error):
        chat.format_chat(messages)


def test_ids_follow_the_official_layout(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    """No <_start>, the default system prompt, a newline after each <_end>."""
    encode = tiny_tokenizer.encode
    system = [6, *encode(chat.DEFAULT_SYSTEM_PROMPT + "\n")]
    expected = [*system, 4, *encode("hi"), 5, *encode("hello"), 2, *encode("\n"), 4, *encode("what is a model?"), 5]
    assert chat.chat_input_ids(tiny_tokenizer, HISTORY) == expected
    assert chat.chat_input_ids(tiny_tokenizer, HISTORY, default_system=None) == expected[len(system) :]


def test_ids_with_system_prompt(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    ids = chat.chat_input_ids(tiny_tokenizer, [{"role": "system", "content": "be brief"}, HISTORY[0]])
    assert ids == [6, *tiny_tokenizer.encode("be brief\n"), 4, *tiny_tokenizer.encode("hi"), 5]


def test_ids_and_text_agree_on_content(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    """The ids are exactly the tokens of the text."""
    for kwargs in ({}, {"default_system": None}, {"tools": [WEATHER_TOOL]}):
        ids = chat.chat_input_ids(tiny_tokenizer, HISTORY, **kwargs)
        assert tiny_tokenizer.encode(chat.format_chat(HISTORY, **kwargs)) == ids


def test_truncation_drops_oldest_whole_turns(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    full = chat.chat_input_ids(tiny_tokenizer, HISTORY, default_system=None)
    last_turn = [4, *tiny_tokenizer.encode("what is a model?"), 5]
    assert chat.chat_input_ids(tiny_tokenizer, HISTORY, max_input_tokens=len(full), default_system=None) == full
    truncated = chat.chat_input_ids(tiny_tokenizer, HISTORY, max_input_tokens=len(full) - 1, default_system=None)
    assert truncated == last_turn  # the first (q, a) turn went as a whole


def test_truncation_keeps_the_system_prompt(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    messages = [{"role": "system", "content": "sys"}, *HISTORY]
    ids = chat.chat_input_ids(tiny_tokenizer, messages, max_input_tokens=40)
    assert ids[0] == 6 and len(ids) <= 40
    assert tiny_tokenizer.decode(ids).endswith("<_user>what is a model?<_bot>")


def test_over_long_question_is_cut_from_the_left(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    question = "one two three four five six seven eight nine ten " * 5
    ids = chat.chat_input_ids(tiny_tokenizer, [{"role": "user", "content": question}], max_input_tokens=12)
    assert len(ids) == 12
    assert ids[0] == 4 and ids[-1] == 5  # the system prompt went first, then the question's start
    assert ids[1:-1] == tiny_tokenizer.encode(question)[-10:]


def test_ids_need_a_user_turn_last(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    with pytest.raises(ValueError, match="last message"):
        chat.chat_input_ids(tiny_tokenizer, HISTORY[:2])
    with pytest.raises(ValueError, match="at least 3"):
        chat.chat_input_ids(tiny_tokenizer, HISTORY, max_input_tokens=2)


def test_parse_tool_calls_inverts_format_tool_call() -> None:
    call = {"function": {"name": "get_weather", "arguments": json.dumps({"city": "北京"}, ensure_ascii=False)}}
    content, calls = chat.parse_tool_calls("Let me check.\n" + chat.format_tool_call(call))
    assert content == "Let me check."
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京"}


def test_parse_tool_calls_leaves_malformed_blocks_in_content() -> None:
    text = "<tool_call>\nnot json\n</tool_call>"
    assert chat.parse_tool_calls(text) == (text, [])


# -- the official template, transcribed ------------------------------------------------------------------------------
#
# Tele-AI/TeleChat2, mindformers-telechat/research/telechat2/telechat_tokenizer.py, `TelechatTokenizer.chat_template`
# (what research/telechat2/run_telechat_predict.py renders with apply_chat_template(add_generation_prompt=True) and
# then tokenizes; add_bos_token is false). Transcribed verbatim, as the Python string's value (jinja escapes kept),
# into official_chat_template.jinja next to this file.
OFFICIAL_TEMPLATE = (Path(__file__).parent / "official_chat_template.jinja").read_text(encoding="utf-8")


def official_text(messages, tools=None) -> str:
    """Render the official template the way Hugging Face / MindFormers `apply_chat_template` does."""
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)  # their override of jinja's tojson
    return env.from_string(OFFICIAL_TEMPLATE).render(messages=messages, tools=tools, add_generation_prompt=True)


SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "网页搜索",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
CONVERSATIONS = {
    "no system": [{"role": "user", "content": "生抽与老抽的区别？"}],
    "system": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a model?"}],
    "multi-turn": [{"role": "system", "content": "你是一个助手"}, *HISTORY],
    "multi-turn, no system": HISTORY,
    "tools": [
        {"role": "user", "content": "weather in 北京 and news?"},
        {
            "role": "assistant",
            "content": "let me check",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
                {"type": "function", "function": {"name": "search", "arguments": {"query": "news"}}},
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "no news"},
        {"role": "assistant", "content": "Sunny, no news."},
        {"role": "user", "content": "thanks"},
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
def test_ids_equal_the_official_templates(name: str, with_tools: bool, tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    messages = CONVERSATIONS[name]
    tools = [WEATHER_TOOL, SEARCH_TOOL] if with_tools else None
    expected = official_text(messages, tools)
    assert chat.format_chat(messages, tools=tools) == expected
    assert chat.chat_input_ids(tiny_tokenizer, messages, tools=tools) == tiny_tokenizer.encode(expected)


def test_official_ids_written_out(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    """The same, spelled as id lists: <_system>=6 <_user>=4 <_bot>=5 <_end>=2 <tool_call>=9 </tool_call>=10
    <tool_response>=11 </tool_response>=12, no <_start>=1."""
    enc = tiny_tokenizer.encode_plain
    default = enc(chat.DEFAULT_SYSTEM_PROMPT + "\n")
    ids = chat.chat_input_ids(tiny_tokenizer, CONVERSATIONS["no system"])
    assert ids == [6, *default, 4, *enc("生抽与老抽的区别？"), 5]
    ids = chat.chat_input_ids(tiny_tokenizer, CONVERSATIONS["multi-turn"])
    turns = [4, *enc("hi"), 5, *enc("hello"), 2, *enc("\n"), 4, *enc("what is a model?"), 5]
    assert ids == [6, *enc("你是一个助手\n"), *turns]
    ids = chat.chat_input_ids(tiny_tokenizer, CONVERSATIONS["tools"], tools=[SEARCH_TOOL])
    tool_line = json.dumps(SEARCH_TOOL, ensure_ascii=False)
    assert ids[0] == 6 and 1 not in ids
    assert tool_line in tiny_tokenizer.decode(ids)
    tail = [
        4, *enc("weather in 北京 and news?"), 5, *enc("let me check"),
        9, *enc('\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'), 10,
        *enc("\n"), 9, *enc('\n{"name": "search", "arguments": {"query": "news"}}\n'), 10, 2, *enc("\n"),
        4, 11, *enc("\nsunny\n"), 12, *enc("\n"), 11, *enc("\nno news\n"), 12,
        5, *enc("Sunny, no news."), 2, *enc("\n"), 4, *enc("thanks"), 5,
    ]  # fmt: skip
    assert ids[-len(tail) :] == tail
