"""TeleChat2's sentencepiece tokenizer with its special tokens at their real ids.

The released tokenizer.model is a sentencepiece BPE model (131072 pieces, split_digits, byte fallback) whose first
pieces are the chat control tokens. `TeleChat2Tokenizer` wraps it so that control tokens written inside text
(`<_user>q<_bot>`) become their single ids, as the seed's prompts and datasets expect, and never add bos/eos on
their own (add_bos_token / add_eos_token are false in TeleChat2).

`train_tiny_tokenizer` trains a small tokenizer with the same special ids in-process: tests, benchmarks and smoke
samples use it because no real weights or tokenizer files are downloaded on these machines.

Importing this module never imports MindSpore. `register_with_mindformers()` makes the class available to
MindFormers YAML (`processor.tokenizer.type: TeleChat2Tokenizer`); it runs on import only when MindFormers is
already loaded.
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Fixed ids of the TeleChat2 tokenizer (facts file, section 3).
UNK_ID = 0
BOS_ID = START_ID = 1
EOS_ID = END_ID = 2
PAD_ID = 3
USER_ID = 4
BOT_ID = 5
SYSTEM_ID = 6
OBSERVATION_ID = 7
SEP_ID = 8
IGNORE_INDEX = -100  # label of positions that carry no loss

UNK = "<_unk>"
START = BOS = "<_start>"
END = EOS = "<_end>"
PAD = "<_pad>"
USER = "<_user>"
BOT = "<_bot>"
SYSTEM = "<_system>"
OBSERVATION = "<_observation>"
SEP = "<_sep>"
# Tool markers of the chat template. In the 3B release they sit at ids 9..12 (unverified for the larger models,
# which list <_control1..9> there); the tokenizer treats them as single tokens only when the vocabulary has them.
TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"

# id -> piece for ids 0..17 of the tokenizer `train_tiny_tokenizer` builds (the 3B release's layout).
SPECIAL_PIECES: tuple[str, ...] = (
    UNK,
    START,
    END,
    PAD,
    USER,
    BOT,
    SYSTEM,
    OBSERVATION,
    SEP,
    TOOL_CALL,
    TOOL_CALL_END,
    TOOL_RESPONSE,
    TOOL_RESPONSE_END,
    *(f"<_control{i}>" for i in range(5, 10)),
)
# Pieces treated as single tokens inside text whenever the vocabulary holds them (real or tiny tokenizer).
KNOWN_SPECIAL_PIECES: frozenset[str] = frozenset(SPECIAL_PIECES) | {f"<_control{i}>" for i in range(1, 10)}


class TeleChat2Tokenizer:
    """sentencepiece tokenizer that understands TeleChat2's control tokens written inside text.

    Extra keyword arguments are accepted (and ignored) so MindFormers can build it from a YAML `processor.tokenizer`
    section that also names unk/bos/eos/pad tokens.
    """

    def __init__(self, vocab_file: str | os.PathLike[str], **_: Any) -> None:
        import sentencepiece as spm  # deferred: the operator imports telechat2 without the model extras

        self.vocab_file = str(vocab_file)
        if not Path(self.vocab_file).is_file():
            raise FileNotFoundError(f"tokenizer vocab_file not found: {self.vocab_file}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.vocab_file)
        except RuntimeError as err:  # sentencepiece: "Internal: could not parse ModelProto from ..."
            raise ValueError(
                f"{self.vocab_file} is not a sentencepiece tokenizer.model ({err}); TeleChat2 needs the "
                "tokenizer.model file of its release, not a vocab.json / tokenizer.json"
            ) from None
        self._check_fixed_ids()
        specials = {
            i: self.sp.id_to_piece(i)
            for i in range(self.sp.get_piece_size())
            if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        # sentencepiece already keeps user-defined pieces whole; naming the known ones also makes `decode` write
        # them back verbatim and `skip_special_tokens` drop them.
        for piece in KNOWN_SPECIAL_PIECES:
            piece_id = self.sp.piece_to_id(piece)
            if piece_id != UNK_ID:
                specials[piece_id] = piece
        self.special_ids: frozenset[int] = frozenset(specials)
        self.special_piece_to_id: dict[str, int] = {piece: i for i, piece in specials.items()}
        # Longest first so that a piece which prefixes another never wins.
        alternatives = sorted(self.special_piece_to_id, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def _check_fixed_ids(self) -> None:
        expected = {UNK_ID: UNK, BOS_ID: START, EOS_ID: END, PAD_ID: PAD, USER_ID: USER, BOT_ID: BOT}
        wrong = {i: self.sp.id_to_piece(i) for i, piece in expected.items() if self.sp.id_to_piece(i) != piece}
        if wrong:
            found = ", ".join(f"{i}={p!r}" for i, p in sorted(wrong.items()))
            raise ValueError(f"{self.vocab_file} is not a TeleChat2 tokenizer: expected {expected}, found {found}")

    # -- vocabulary ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece; UNK_ID when the vocabulary lacks it."""
        return self.sp.piece_to_id(piece)

    def has_piece(self, piece: str) -> bool:
        return piece in self.special_piece_to_id or self.sp.piece_to_id(piece) != UNK_ID

    @property
    def bos_token_id(self) -> int:
        return BOS_ID

    @property
    def eos_token_id(self) -> int:
        return EOS_ID

    @property
    def pad_token_id(self) -> int:
        return PAD_ID

    # -- encoding -----------------------------------------------------------------------------------------------

    def split_special(self, text: str) -> list[str | int]:
        """Split text into plain-text segments (str) and special-token ids (int), in order."""
        parts: list[str | int] = []
        for index, segment in enumerate(self._special_re.split(text)):
            if index % 2:
                parts.append(self.special_piece_to_id[segment])
            elif segment:
                parts.append(segment)
        return parts

    def encode_plain(self, text: str) -> list[int]:
        """sentencepiece ids of text, control-token strings not interpreted."""
        return self.sp.encode(text) if text else []

    def encode_plain_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """`encode_plain` over many texts in one sentencepiece call (faster: one C++ round trip)."""
        return self.sp.encode(list(texts), num_threads=num_threads) if texts else []

    def encode(self, text: str) -> list[int]:
        """Ids of text; `<_user>` and the other control-token strings become their single ids. No bos/eos added."""
        ids: list[int] = []
        for part in self.split_special(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """`encode` over many texts, plain segments sent to sentencepiece in one batch."""
        split = [self.split_special(text) for text in texts]
        plain = [part for parts in split for part in parts if isinstance(part, str)]
        encoded = iter(self.encode_plain_batch(plain, num_threads=num_threads))
        result = []
        for parts in split:
            ids: list[int] = []
            for part in parts:
                if isinstance(part, int):
                    ids.append(part)
                else:
                    ids.extend(next(encoded))
            result.append(ids)
        return result

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        """MindFormers-style call: {"input_ids": ...}."""
        return {"input_ids": self.encode(text)}

    # -- decoding -----------------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids; control tokens are written as their piece (`<_end>`) unless skip_special_tokens."""
        out: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id in self.special_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.sp.id_to_piece(token_id))
            else:
                run.append(token_id)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]


# -- a tiny tokenizer with TeleChat2's special ids, trained in-process ----------------------------------------------

_EN_TEXT = (
    "the model reads a question and writes an answer about data training cluster network memory device node "
    "checkpoint parallel layer token sequence batch learning rate loss step epoch weight merge convert predict "
    "what why how when where which could would should please explain describe give list compare summarise "
    "history science music river mountain city language computer number simple small large fast slow good bad"
)
_ZH_TEXT = (
    "人工智能 模型 数据 训练 推理 问题 回答 中国 文学 历史 计算机 语言 网络 学习 生活 未来 发展 技术 "
    "生抽 老抽 区别 颜色 味道 城市 河流 山脉 音乐 科学 简单 快速 描述 解释 比较 总结 请 什么 为什么 怎么 "
    "的 与 是 了 和 在 有 我 你 吗"
)


def tiny_corpus(lines: int = 3000, seed: int = 0) -> Iterator[str]:
    """Deterministic English + Chinese + digits text, enough for a 512-piece BPE model."""
    rng = random.Random(seed)
    en_words, zh_words = _EN_TEXT.split(), _ZH_TEXT.split()
    for _ in range(lines):
        words = [rng.choice(en_words) for _ in range(rng.randint(4, 14))]
        zh = "".join(rng.choice(zh_words) for _ in range(rng.randint(2, 8)))
        number = str(rng.randint(0, 100000))
        yield f"{' '.join(words).capitalize()} {number}.\n{zh}，{zh[: len(zh) // 2]}。"


def train_tiny_tokenizer(
    path: str | os.PathLike[str], vocab_size: int = 512, corpus: Iterable[str] | None = None
) -> Path:
    """Train a small sentencepiece BPE tokenizer.model at `path` with TeleChat2's special ids (0..17).

    Deterministic (one thread, fixed corpus); written atomically. Returns the path.
    """
    import sentencepiece as spm

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus if corpus is not None else tiny_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        # Keep text as written (full-width punctuation, newlines, repeated spaces) so decode(encode(x)) == x.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        unk_piece=UNK,
        bos_piece=START,
        eos_piece=END,
        pad_piece=PAD,
        user_defined_symbols=list(SPECIAL_PIECES[4:]),
        num_threads=1,
        minloglevel=2,
    )
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".model", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.getvalue())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    tokenizer = TeleChat2Tokenizer(target)
    placed = [tokenizer.id_to_piece(i) for i in range(len(SPECIAL_PIECES))]
    misplaced = [
        (i, want, got) for i, (want, got) in enumerate(zip(SPECIAL_PIECES, placed, strict=True)) if want != got
    ]
    if misplaced:
        raise RuntimeError(f"special tokens not at TeleChat2 ids (id, wanted, got): {misplaced}")
    return target


# -- MindFormers registration -----------------------------------------------------------------------------------------


def register_with_mindformers() -> bool:
    """Register TeleChat2Tokenizer as a MindFormers TOKENIZER; False when MindFormers is not installed."""
    try:
        from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    except ImportError:
        return False
    MindFormerRegister.register_cls(TeleChat2Tokenizer, module_type=MindFormerModuleType.TOKENIZER)
    return True


if "mindformers" in sys.modules:  # already paid for: make the YAML type name resolvable right away
    register_with_mindformers()
