"""`telechat2 preprocess`: sample layout, packing, error handling and the MindRecord it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from telechat2 import preprocess
from telechat2 import tokenizer as tk
from telechat2.cli import main

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_preprocess.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_preprocess", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- parsing -----------------------------------------------------------------------------------------------------


def test_single_turn() -> None:
    assert preprocess.conversation_turns("<_user>q", "a") == [("q", "a")]
    assert preprocess.conversation_turns("q without marker", "a") == [("q without marker", "a")]
    assert preprocess.conversation_turns("<_user>q<_bot>", "a") == [("q", "a")]  # trailing <_bot> tolerated


def test_multi_turn_history() -> None:
    pairs = preprocess.conversation_turns("<_user>q1<_bot>a1<_user>q2<_bot>a2<_end><_user>q3", "a3")
    assert pairs == [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("<_user>q1<_user>q2", "history turn 1 of 2 has no <_bot> answer"),
        ("<_user>q1<_bot>a<_bot>b<_user>q2", "history turn 1 of 2 has 2 <_bot> markers"),
        ("<_user>q1<_bot>a1", "last <_user> turn must be the question"),
    ],
)
def test_ambiguous_history_is_an_error(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        preprocess.conversation_turns(text, "a")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ('["input", "output"]', "expected a JSON object"),
        ('{"input": "q"}', "missing field 'output'"),
        ('{"output": "a"}', "missing field 'input'"),
        ('{"input": 1, "output": "a"}', "field 'input' must be a string, got int"),
        ('{"input": "q", "output": null}', "field 'output' must be a string, got NoneType"),
        ('{"input": "q", "output": "  "}', "field 'output' is empty"),
        ('{"input": "<_user>a<_user>b", "output": "x"}', "history turn 1 of 2"),
    ],
)
def test_bad_records_name_line_and_reason(line: str, reason: str) -> None:
    with pytest.raises(preprocess.BadLine, match=r"^line 7: .*" + reason.replace("(", r"\(")):
        preprocess.parse_record(line, "7")


# -- layout ------------------------------------------------------------------------------------------------------


def test_sample_layout_masks_user_turns() -> None:
    input_ids, labels = preprocess.sample_from_ids([([10, 11], [20]), ([12], [21, 22])])
    assert input_ids == [1, 4, 10, 11, 5, 20, 2, 4, 12, 5, 21, 22, 2]
    assert labels == [-100, -100, -100, -100, -100, 20, 2, -100, -100, -100, 21, 22, 2]


def test_tokenize_samples_uses_the_tokenizer(tiny_tokenizer: tk.TeleChat2Tokenizer) -> None:
    (sample,) = preprocess.tokenize_samples(tiny_tokenizer, [[("what is data?", "numbers 42")]])
    q, a = tiny_tokenizer.encode("what is data?"), tiny_tokenizer.encode("numbers 42")
    assert sample == ([1, 4, *q, 5, *a, 2], [-100] * (len(q) + 3) + [*a, 2])


def sample(n: int, token: int = 50) -> tuple[list[int], list[int]]:
    """A sample of n tokens: <_start> then `token` repeated (labels = ids except the first)."""
    return [1] + [token] * (n - 1), [-100] + [token] * (n - 1)


def test_packing_boundaries_and_left_padding() -> None:
    max_length = 10  # rows of 11
    packs = list(
        preprocess.pack_samples([sample(4, 50), sample(6, 51), sample(1, 52), sample(10, 53), sample(3, 54)], 10)
    )
    # 4 + 6 = 10 < 11 fits; + 1 would reach 11 -> new pack; 1 + 10 reaches 11 -> new pack; 10 + 3 too; last partial.
    contents = [ids[ids != tk.PAD_ID].tolist() for ids, _ in packs]
    assert contents == [sample(4, 50)[0] + sample(6, 51)[0], sample(1, 52)[0], sample(10, 53)[0], sample(3, 54)[0]]
    for ids, labels in packs:
        assert ids.shape == labels.shape == (max_length + 1,) and ids.dtype == labels.dtype == np.int32
        pads = int(np.argmax(ids != tk.PAD_ID))
        assert pads >= 1  # a pack never reaches max_length + 1 tokens of content
        assert (ids[:pads] == tk.PAD_ID).all() and (labels[:pads] == -100).all()
        assert (ids[pads:] != tk.PAD_ID).all()


def test_final_partial_pack_is_written() -> None:
    packs = list(preprocess.pack_samples([sample(3)], 100))
    assert len(packs) == 1 and packs[0][0][-3:].tolist() == sample(3)[0]


def test_pack_rejects_an_over_long_sample() -> None:
    with pytest.raises(ValueError, match="longer than max_length 5"):
        list(preprocess.pack_samples([sample(6)], 5))


def test_left_pad() -> None:
    ids, labels = preprocess.left_pad([1, 4, 5], [-100, -100, 7], 5)
    assert ids.tolist() == [3, 3, 1, 4, 5] and labels.tolist() == [-100, -100, -100, -100, 7]


def test_matches_the_reference_algorithm(tiny_tokenizer, tmp_path) -> None:
    """Same packs as a per-sample port of the seed's script, up to its two quirks (see bench_preprocess)."""
    bench = load_bench()
    records = bench.generate_records(300, seed=3)
    path = write_jsonl(tmp_path / "train.jsonl", records)
    max_length = 2048
    report = preprocess.PreprocessReport(row_length=max_length + 1)
    ours = list(
        preprocess.pack_samples(
            preprocess.iter_samples(tiny_tokenizer, preprocess.read_lines([path]), max_length, report, overlong="skip"),
            max_length,
        )
    )
    reference = bench.reference_preprocess(records, tiny_tokenizer, max_length)
    assert report.overlong_lines == []  # with none, the packing decisions must be identical
    assert len(reference) >= 10
    assert len(ours) == len(reference) + 1  # the reference drops the final partial pack
    for ref, (ids, labels) in zip(reference, ours, strict=False):
        assert bench.same_pack(ref["input_ids"], ref["labels"], ids.tolist(), labels.tolist())


# -- runs --------------------------------------------------------------------------------------------------------

RECORDS = [
    {"input": "<_user>描述一下中国古代文学的典型特点。", "output": "中国古代文学的典型特点包括散文和诗歌。"},
    {"input": "<_user>what is a model?<_bot>a network<_user>and data?", "output": "data trains it"},
    {"input": "plain question", "output": "plain answer"},
]


def read_mindrecord(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    import mindspore.dataset as ds

    dataset = ds.MindDataset(str(path), columns_list=["input_ids", "labels"], shuffle=False)
    return [(row["input_ids"], row["labels"]) for row in dataset.create_dict_iterator(output_numpy=True)]


def expected_packs(tokenizer, records, max_length):
    conversations = [preprocess.conversation_turns(r["input"], r["output"]) for r in records]
    return list(preprocess.pack_samples(preprocess.tokenize_samples(tokenizer, conversations), max_length))


def test_writes_mindrecord_read_back_by_minddataset(tiny_tokenizer_file, tiny_tokenizer, tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [*RECORDS, ""])  # a trailing blank line is not a record
    out = tmp_path / "out"
    report = preprocess.preprocess(path, tiny_tokenizer_file, 128, out)
    target = out / "dataset.mindrecord"
    assert report.output_file == target and target.exists() and Path(f"{target}.db").exists()
    assert sorted(p.name for p in out.iterdir()) == ["dataset.mindrecord", "dataset.mindrecord.db"]  # no temp left
    rows = read_mindrecord(target)
    expected = expected_packs(tiny_tokenizer, RECORDS, 128)
    assert len(rows) == len(expected) == report.packs
    for (ids, labels), (want_ids, want_labels) in zip(rows, expected, strict=True):
        assert ids.dtype == np.int32 and ids.shape == (129,)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(labels, want_labels)
    assert (report.lines, report.samples) == (3, 3)
    assert report.tokens == sum(int((ids != tk.PAD_ID).sum()) for ids, _ in rows)


def test_output_path_may_be_a_file(tiny_tokenizer_file, tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    target = tmp_path / "deep" / "train.mindrecord"
    preprocess.preprocess(path, tiny_tokenizer_file, 128, target)
    assert target.exists() and len(read_mindrecord(target)) >= 1
    preprocess.preprocess(path, tiny_tokenizer_file, 256, target)  # a re-run replaces it
    assert read_mindrecord(target)[0][0].shape == (257,)


def test_bad_line_fails_and_writes_nothing(tiny_tokenizer_file, tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [RECORDS[2], "{broken", RECORDS[2], {"input": "q", "output": ""}])
    out = tmp_path / "never" / "created"
    with pytest.raises(preprocess.PreprocessError) as raised:
        preprocess.preprocess(path, tiny_tokenizer_file, 128, out)
    message = str(raised.value)
    assert "2 malformed line(s)" in message and "line 2: invalid JSON" in message
    assert "line 4: field 'output' is empty" in message
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_skip_bad_lines_reports_them(tiny_tokenizer_file, tmp_path, capsys) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [RECORDS[2], '{"input": 3, "output": "a"}', RECORDS[1]])
    out = tmp_path / "out.mindrecord"
    argv = ["preprocess", "--input-dataset-file", str(path), "--vocab-file-path", str(tiny_tokenizer_file)]
    assert main([*argv, "--max-length", "128", "--output-path", str(out), "--skip-bad-lines"]) == 0
    captured = capsys.readouterr()
    assert "skipped line 2: field 'input' must be a string, got int" in captured.err
    assert "2 samples" in captured.out and "1 bad line skipped" in captured.out
    assert len(read_mindrecord(out)) == 1


def test_overlong_error_lists_lines(tiny_tokenizer_file, tmp_path, capsys) -> None:
    long_record = {"input": "word " * 200, "output": "answer"}
    path = write_jsonl(tmp_path / "train.jsonl", [RECORDS[2], long_record, RECORDS[2], long_record])
    argv = ["preprocess", "--input_dataset_file", str(path), "--vocab_file_path", str(tiny_tokenizer_file)]
    out = tmp_path / "out"
    assert main([*argv, "--max_length", "64", "--output_path", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2 sample(s) longer than --max_length 64 tokens at line(s) 2, 4" in err and "--overlong" in err
    assert not out.exists()


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_overlong_skip_or_truncate(tiny_tokenizer_file, tiny_tokenizer, tmp_path, policy) -> None:
    long_record = {"input": "word " * 200, "output": "answer"}
    path = write_jsonl(tmp_path / "train.jsonl", [RECORDS[2], long_record])
    report = preprocess.preprocess(path, tiny_tokenizer_file, 64, tmp_path / "o.mindrecord", overlong=policy)
    assert report.overlong_lines == ["2"]
    rows = read_mindrecord(tmp_path / "o.mindrecord")
    short = expected_packs(tiny_tokenizer, [RECORDS[2]], 64)[0][0]
    if policy == "skip":
        assert report.samples == 1 and len(rows) == 1
        np.testing.assert_array_equal(rows[0][0], short)
    else:
        assert report.samples == 2 and len(rows) == 2
        assert (rows[1][0] != tk.PAD_ID).sum() == 64  # cut to max_length tokens, one pad
        assert rows[1][0][1:3].tolist() == [tk.BOS_ID, tk.USER_ID]
    assert f"over-long {'skipped' if policy == 'skip' else 'truncated'} (lines 2)" in report.summary()


def test_directory_input_names_the_file(tiny_tokenizer_file, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", RECORDS)
    write_jsonl(folder / "b.jsonl", [RECORDS[0], "oops"])
    with pytest.raises(preprocess.PreprocessError, match=r"line b\.jsonl:2: invalid JSON"):
        preprocess.preprocess(folder, tiny_tokenizer_file, 128, tmp_path / "o")


def test_missing_inputs_are_named(tiny_tokenizer_file, tmp_path) -> None:
    with pytest.raises(preprocess.PreprocessError, match="--input_dataset_file .*nope.jsonl: no such file"):
        preprocess.preprocess(tmp_path / "nope.jsonl", tiny_tokenizer_file, 128, tmp_path / "o")
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        preprocess.preprocess(path, tmp_path / "missing.model", 128, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_progress_bar_goes_to_stderr(tmp_path, capsys) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    lines = list(preprocess.read_lines([path], progress=True))
    assert len(lines) == 3
    assert "preprocess" in capsys.readouterr().err


def test_cli_accepts_seed_and_hyphenated_names() -> None:
    import argparse

    for style in ("_", "-"):
        parser = argparse.ArgumentParser()
        preprocess.configure_parser(parser)
        args = parser.parse_args(
            [
                f"--input{style}dataset{style}file",
                "x.jsonl",
                f"--vocab{style}file{style}path",
                "t.model",
                f"--max{style}length",
                "16",
                f"--output{style}path",
                "o",
            ]
        )
        assert (args.input_dataset_file, args.vocab_file_path, args.max_length, args.output_path) == (
            "x.jsonl",
            "t.model",
            16,
            "o",
        )
        assert args.overlong == "error" and not args.skip_bad_lines


def test_many_bad_lines_stop_reading_early(tiny_tokenizer_file, tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [RECORDS[2]] + ["{bad"] * 250)
    with pytest.raises(preprocess.PreprocessError, match=r"^at least 201 malformed line\(s\): line 2: invalid JSON"):
        preprocess.preprocess(path, tiny_tokenizer_file, 128, tmp_path / "o")


# -- hostile input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"input": "q\\ud800x", "output": "a"}', r"field 'input' holds a lone surrogate \\ud800 at character 1"),
        ('{"input": "q", "output": "\\udfff"}', r"field 'output' holds a lone surrogate \\udfff at character 0"),
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        ('{"input": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001, "JSON nested too deeply"),
    ],
    ids=["surrogate-in-input", "surrogate-in-output", "nested-arrays", "nested-objects"],
)
def test_hostile_records_name_the_line(line: str, reason: str) -> None:
    with pytest.raises(preprocess.BadLine, match=r"^line 3: " + reason):
        preprocess.parse_record(line, "3")


def test_a_valid_surrogate_pair_is_text() -> None:
    assert preprocess.parse_record('{"input": "\\ud83d\\ude00", "output": "a"}', "1") == [("\U0001f600", "a")]


def test_hostile_lines_fail_the_run_naming_them(tiny_tokenizer_file, tmp_path, capsys) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [RECORDS[2], '{"input": "q\\ud800", "output": "a"}', "[" * 50_000 + "]" * 50_000, RECORDS[1]],
    )
    argv = ["preprocess", "--input_dataset_file", str(path), "--vocab_file_path", str(tiny_tokenizer_file)]
    assert main([*argv, "--output_path", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "line 2: field 'input' holds a lone surrogate" in err and "line 3: JSON nested too deeply" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_utf8_bom_opening_a_line_is_accepted(tiny_tokenizer_file, tiny_tokenizer, tmp_path) -> None:
    body = "".join("\ufeff" + json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS)  # a BOM on every line
    (tmp_path / "bom.jsonl").write_text(body, encoding="utf-8")
    write_jsonl(tmp_path / "plain.jsonl", RECORDS)
    preprocess.preprocess(tmp_path / "bom.jsonl", tiny_tokenizer_file, 128, tmp_path / "bom.mindrecord")
    preprocess.preprocess(tmp_path / "plain.jsonl", tiny_tokenizer_file, 128, tmp_path / "plain.mindrecord")
    bom, plain = read_mindrecord(tmp_path / "bom.mindrecord"), read_mindrecord(tmp_path / "plain.mindrecord")
    assert len(bom) == len(plain) and all(np.array_equal(a[0], b[0]) for a, b in zip(bom, plain, strict=True))


def test_a_vocab_that_is_not_sentencepiece_is_named(tmp_path, capsys) -> None:
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<_unk>": 0, "<_start>": 1}))
    with pytest.raises(ValueError, match=rf"{vocab} is not a sentencepiece tokenizer.model"):
        tk.TeleChat2Tokenizer(vocab)
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    argv = ["preprocess", "--input_dataset_file", str(path), "--vocab_file_path", str(vocab)]
    assert main([*argv, "--output_path", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"--vocab_file_path: {vocab} is not a sentencepiece tokenizer.model" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_over_long_line_is_refused_before_parsing_naming_it(tiny_tokenizer_file, tmp_path, monkeypatch) -> None:
    huge = json.dumps({"input": "word " * 2000, "output": "a"})  # ~10 kB
    path = write_jsonl(tmp_path / "train.jsonl", [RECORDS[2], huge, RECORDS[1]])
    parsed: list[str] = []
    real_parse = preprocess.parse_record
    monkeypatch.setattr(preprocess, "parse_record", lambda line, where: parsed.append(where) or real_parse(line, where))
    with pytest.raises(preprocess.PreprocessError) as raised:
        preprocess.preprocess(path, tiny_tokenizer_file, 128, tmp_path / "o", max_line_bytes=4096)
    assert f"line 2: line of {len(huge.encode())} bytes is longer than --max-line-bytes 4096" in str(raised.value)
    assert parsed == ["1", "3"]  # the long line was never handed to the JSON parser
    report = preprocess.preprocess(
        path, tiny_tokenizer_file, 128, tmp_path / "o", max_line_bytes=4096, skip_bad_lines=True
    )
    assert report.samples == 2 and [b.where for b in report.bad_lines] == ["2"]
    report = preprocess.preprocess(path, tiny_tokenizer_file, 8192, tmp_path / "o2", max_line_bytes=len(huge.encode()))
    assert report.samples == 3 and not report.bad_lines  # exactly the limit is accepted


def test_line_limit_reads_the_long_line_in_pieces(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(preprocess, "_READ_CHUNK", 64)
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"x" * 1000 + b"\n" + b"short\n" + b"y" * 300)  # last line over-long and without a newline
    lines = list(preprocess.read_lines([path], max_line_bytes=100))
    assert [w for w, _ in lines] == ["1", "2", "3"]
    assert isinstance(lines[0][1], preprocess.BadLine) and "line of 1000 bytes" in str(lines[0][1])
    assert lines[1][1] == "short\n"
    assert isinstance(lines[2][1], preprocess.BadLine) and "line of 300 bytes" in str(lines[2][1])


def test_max_line_bytes_flag(tiny_tokenizer_file) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    preprocess.configure_parser(parser)
    base = ["--input_dataset_file", "x", "--vocab_file_path", "t", "--output_path", "o"]
    assert parser.parse_args(base).max_line_bytes == preprocess.DEFAULT_MAX_LINE_BYTES == 4 * 2**20
    assert parser.parse_args([*base, "--max-line-bytes", "64MiB"]).max_line_bytes == 64 * 2**20
    assert parser.parse_args([*base, "--max_line_bytes", "1000"]).max_line_bytes == 1000
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--max-line-bytes", "lots"])
