"""TeleChat2Tokenizer over a tiny sentencepiece model trained in-process with the real special ids."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sentencepiece as spm

from telechat2 import tokenizer as tk


def test_special_ids_are_telechat2s(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    pieces = {
        tk.UNK_ID: "<_unk>",
        tk.BOS_ID: "<_start>",
        tk.EOS_ID: "<_end>",
        tk.PAD_ID: "<_pad>",
        tk.USER_ID: "<_user>",
        tk.BOT_ID: "<_bot>",
        tk.SYSTEM_ID: "<_system>",
        tk.OBSERVATION_ID: "<_observation>",
        tk.SEP_ID: "<_sep>",
    }
    for token_id, piece in pieces.items():
        assert tiny_tokenizer.id_to_piece(token_id) == piece
        assert tiny_tokenizer.piece_to_id(piece) == token_id
    assert [tiny_tokenizer.id_to_piece(i) for i in range(9, 13)] == [
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
    ]


def test_byte_fallback_and_split_digits(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    ids = tiny_tokenizer.encode("2024 ☃")
    pieces = tiny_tokenizer.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p.strip("▁").isdigit()] == ["2", "0", "2", "4"]  # one digit per piece
    assert "<0xE2>" in pieces  # the snowman is not in the vocabulary: UTF-8 bytes, never <_unk>
    assert tk.UNK_ID not in ids


def test_encode_recognises_special_strings_inside_text(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    ids = tiny_tokenizer.encode("<_start><_user>what is data?<_bot>a model<_end>")
    assert ids[:2] == [tk.BOS_ID, tk.USER_ID]
    assert ids[-1] == tk.EOS_ID
    assert ids.count(tk.BOT_ID) == 1
    question = ids[2 : ids.index(tk.BOT_ID)]
    assert question == tiny_tokenizer.encode_plain("what is data?")


def test_no_bos_or_eos_added(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    ids = tiny_tokenizer.encode("hello world")
    assert tk.BOS_ID not in ids and tk.EOS_ID not in ids
    assert tiny_tokenizer.encode("") == []


def test_matches_bare_sentencepiece_on_plain_text(tiny_tokenizer_file, tiny_tokenizer) -> None:
    bare = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_file))
    text = "Explain the checkpoint merge 123 中国文学的历史"
    assert tiny_tokenizer.encode(text) == bare.encode(text)


@pytest.mark.parametrize(
    "text",
    [
        "<_system>be brief\n<_user>生抽与老抽的区别？<_bot>颜色不同。<_end>\n<_user>why  twice?<_bot>",
        "  leading and   repeated spaces\n\nand newlines  ",
        '<tool_call>\n{"name": "f"}\n</tool_call>',
    ],
)
def test_decode_round_trip(tiny_tokenizer: tk.TeleChat2Tokenizer, text: str) -> None:
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_decode_skip_special_tokens(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    ids = tiny_tokenizer.encode("<_start><_user>hi<_bot>hello<_end>")
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "hihello"


def test_encode_batch_equals_encode(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    texts = ["<_user>a question<_bot>", "", "plain 42", "<_end><_end>x"]
    assert tiny_tokenizer.encode_batch(texts) == [tiny_tokenizer.encode(t) for t in texts]


def test_rejects_a_tokenizer_without_telechat2_ids(tmp_path) -> None:
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tk.tiny_corpus(300)), model_writer=model, vocab_size=300, minloglevel=2
    )
    path = tmp_path / "other.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="not a TeleChat2 tokenizer"):
        tk.TeleChat2Tokenizer(path)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tk.TeleChat2Tokenizer(tmp_path / "missing.model")


def test_training_is_deterministic(tmp_path, tiny_tokenizer_file) -> None:
    again = tk.train_tiny_tokenizer(tmp_path / "again.model")
    assert again.read_bytes() == tiny_tokenizer_file.read_bytes()


def test_import_does_not_load_mindspore() -> None:
    code = "import sys, telechat2.tokenizer, telechat2.chat; assert 'mindspore' not in sys.modules, 'mindspore'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_with_mindformers(tiny_tokenizer_file) -> None:
    """A MindFormers YAML `processor.tokenizer: {type: TeleChat2Tokenizer, vocab_file: ...}` builds ours."""
    register = pytest.importorskip("mindformers.tools.register")
    build = pytest.importorskip("mindformers.models.build_tokenizer")
    assert tk.register_with_mindformers()
    assert register.MindFormerRegister.is_exist(register.MindFormerModuleType.TOKENIZER, "TeleChat2Tokenizer")
    built = build.build_tokenizer({"type": "TeleChat2Tokenizer", "vocab_file": str(tiny_tokenizer_file)})
    assert isinstance(built, tk.TeleChat2Tokenizer)
    assert built("<_user>hi<_bot>")["input_ids"][0] == tk.USER_ID
