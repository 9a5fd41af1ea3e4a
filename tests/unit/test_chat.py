"""Chat formatting: the text prompt and the Hugging Face style ids of the facts file."""

from __future__ import annotations

import json

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
    assert chat.format_chat([{"role": "user", "content": "生抽与老抽的区别？"}]) == "<_user>生抽与老抽的区别？<_bot>"


def test_multi_turn_with_system_text() -> None:
    text = chat.format_chat([{"role": "system", "content": "be brief"}, *HISTORY])
    assert text == "<_system>be brief\n<_user>hi<_bot>hello<_end>\n<_user>what is a model?<_bot>"


def test_no_generation_prompt_ends_after_the_answer() -> None:
    text = chat.format_chat(HISTORY[:2], add_generation_prompt=False)
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
    assert chat.format_chat([message]) == "<_user>ab<_bot>"


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


def test_ids_follow_the_hf_layout(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    encode = tiny_tokenizer.encode
    expected = [1, 4, *encode("hi"), 5, *encode("hello"), 2, 4, *encode("what is a model?"), 5]
    assert chat.chat_input_ids(tiny_tokenizer, HISTORY) == expected


def test_ids_with_system_prompt(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    ids = chat.chat_input_ids(tiny_tokenizer, [{"role": "system", "content": "be brief"}, HISTORY[0]])
    assert ids == [1, 6, *tiny_tokenizer.encode("be brief\n"), 4, *tiny_tokenizer.encode("hi"), 5]


def test_ids_and_text_agree_on_content(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    """Both forms carry the same tokens; the text form only adds a newline after each <_end>."""
    ids = chat.chat_input_ids(tiny_tokenizer, HISTORY)
    text = "<_start>" + chat.format_chat(HISTORY).replace("<_end>\n", "<_end>")
    assert tiny_tokenizer.encode(text) == ids


def test_truncation_drops_oldest_whole_turns(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    full = chat.chat_input_ids(tiny_tokenizer, HISTORY)
    last_turn = [4, *tiny_tokenizer.encode("what is a model?"), 5]
    assert chat.chat_input_ids(tiny_tokenizer, HISTORY, max_input_tokens=len(full)) == full
    truncated = chat.chat_input_ids(tiny_tokenizer, HISTORY, max_input_tokens=len(full) - 1)
    assert truncated == [1, *last_turn]  # the first (q, a) turn went as a whole


def test_truncation_keeps_the_system_prompt(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    messages = [{"role": "system", "content": "sys"}, *HISTORY]
    ids = chat.chat_input_ids(tiny_tokenizer, messages, max_input_tokens=40)
    assert ids[:2] == [1, 6] and len(ids) <= 40
    assert tiny_tokenizer.decode(ids).endswith("<_user>what is a model?<_bot>")


def test_over_long_question_is_cut_from_the_left(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    question = "one two three four five six seven eight nine ten " * 5
    ids = chat.chat_input_ids(tiny_tokenizer, [{"role": "user", "content": question}], max_input_tokens=12)
    assert len(ids) == 12
    assert ids[:2] == [1, 4] and ids[-1] == 5
    assert ids[2:-1] == tiny_tokenizer.encode(question)[-9:]


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
