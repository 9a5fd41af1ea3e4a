"""Shared unit-test fixtures: a tiny sentencepiece tokenizer with TeleChat2's special ids, trained in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from telechat2 import tokenizer as tk


@pytest.fixture(scope="session")
def tiny_tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.model (vocab 512, BPE, byte fallback, split digits) with <_unk>..<_control9> at ids 0..17."""
    path = tk.train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model", vocab_size=512)
    tokenizer = tk.TeleChat2Tokenizer(path)
    expected = {
        0: "<_unk>",
        1: "<_start>",
        2: "<_end>",
        3: "<_pad>",
        4: "<_user>",
        5: "<_bot>",
        6: "<_system>",
        7: "<_observation>",
        8: "<_sep>",
    }
    assert {i: tokenizer.id_to_piece(i) for i in expected} == expected
    assert tokenizer.vocab_size == 512
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_file: Path) -> tk.TeleChat2Tokenizer:
    return tk.TeleChat2Tokenizer(tiny_tokenizer_file)
