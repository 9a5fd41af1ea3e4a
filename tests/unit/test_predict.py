"""`telechat2 predict` and `load_model`: configs by name or YAML, strict checkpoint loading, CLI, chat mode."""

from __future__ import annotations

import io
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import yaml
from tiny_model import TINY_ARCHITECTURE, build_tiny_model, save_tiny_checkpoint

from telechat2.chat import chat_input_ids
from telechat2.cli import main
from telechat2.generation import GenerationConfig, generate
from telechat2.loading import load_model
from telechat2.predict import chat_loop

PROMPT = "<_start><_user>Hello 123<_bot>"


@pytest.fixture(autouse=True)
def _pynative_mode():
    """Eager execution, whatever mode an earlier test left behind (load_model sets it too)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", seed=51)[1]


@pytest.fixture(scope="module")
def reference():
    return build_tiny_model(seed=51)


def _ids(length: int = 7) -> ms.Tensor:
    return ms.Tensor(np.random.default_rng(52).integers(4, 512, (1, length)), ms.int32)


def test_load_model_by_name_restores_the_checkpoint(checkpoint, reference):
    model = load_model("telechat2-tiny", str(checkpoint))
    assert ms.get_context("mode") == ms.PYNATIVE_MODE
    np.testing.assert_array_equal(model(_ids()).asnumpy(), reference(_ids()).asnumpy())


def test_load_model_from_a_yaml_file_or_directory_with_a_seq_length_override(tmp_path, checkpoint, reference):
    config = tmp_path / "predict.yaml"
    model_config = {"type": "TeleChat2Config", **TINY_ARCHITECTURE, "use_flash_attention": True}
    config.write_text(yaml.safe_dump({"model": {"model_config": model_config}}))
    (tmp_path / "out" / "rank_0").mkdir(parents=True)
    (tmp_path / "out" / "rank_0" / "telechat2-1_5.ckpt").write_bytes(checkpoint.read_bytes())
    model = load_model(str(config), str(tmp_path / "out"), seq_length=32)
    assert model.architecture.seq_length == 32
    assert not model.architecture.use_flash_attention  # Ascend kernels switched off on CPU
    np.testing.assert_array_equal(model(_ids()).asnumpy(), reference(_ids()).asnumpy())


def _save(params: dict[str, np.ndarray], path: Path) -> str:
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path))
    return str(path)


def test_checkpoint_problems_name_the_parameters(tmp_path, reference):
    params = {name: p.asnumpy() for name, p in reference.parameters_and_names()}
    without_norm = {k: v for k, v in params.items() if k != "model.norm_out.weight"}
    with pytest.raises(ValueError, match=r"missing: model\.norm_out\.weight"):
        load_model("telechat2-tiny", _save(without_norm, tmp_path / "a.ckpt"))
    extra = dict(params, **{"model.layers.2.attention.wq.weight": params["model.layers.0.attention.wq.weight"]})
    with pytest.raises(ValueError, match=r"unexpected: model\.layers\.2\.attention\.wq\.weight"):
        load_model("telechat2-tiny", _save(extra, tmp_path / "b.ckpt"))
    short_vocab = dict(params, **{"lm_head.weight": params["lm_head.weight"][:256]})
    with pytest.raises(ValueError, match=r"wrong shape: lm_head\.weight \(256, 64\) != \(512, 64\)"):
        load_model("telechat2-tiny", _save(short_vocab, tmp_path / "c.ckpt"))
    fused = {k: v for k, v in params.items() if "wk_v" not in k and "wq" not in k}  # a qkv_concat checkpoint
    fused |= {f"model.layers.{i}.attention.w_qkv.weight": np.zeros((128, 64), np.float32) for i in range(2)}
    with pytest.raises(ValueError, match=r"missing: .*attention\.wk_v\.weight.*unexpected: .*w_qkv.*qkv_concat"):
        load_model("telechat2-tiny", _save(fused, tmp_path / "e.ckpt"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_model("telechat2-tiny", str(tmp_path / "nope.ckpt"))
    # optimizer state saved by finetune (adam moments, step counters) is not part of the network: ignored
    with_optimizer = dict(params, **{"adam_m.lm_head.weight": params["lm_head.weight"], "global_step": np.ones(1)})
    model = load_model("telechat2-tiny", _save(with_optimizer, tmp_path / "d.ckpt"))
    np.testing.assert_array_equal(model(_ids()).asnumpy(), reference(_ids()).asnumpy())


def test_predict_cli_prints_the_greedy_answer(capsys, checkpoint, reference, tiny_tokenizer_file, tiny_tokenizer):
    argv = ["predict", "--config", "telechat2-tiny", "--load-checkpoint", str(checkpoint)]
    argv += ["--vocab_file", str(tiny_tokenizer_file), "--predict_data", PROMPT, "--max_new_tokens", "6"]
    assert main(argv) == 0
    # the tiny YAML carries TeleChat2's defaults: greedy with repetition penalty 1.03, stop at <_end>
    expected = generate(reference, tiny_tokenizer.encode(PROMPT), GenerationConfig(max_new_tokens=6))
    assert len(expected) == 6
    assert capsys.readouterr().out == tiny_tokenizer.decode(expected) + "\n"


def test_predict_cli_sampling_is_reproducible_with_a_seed(capsys, checkpoint, tiny_tokenizer_file):
    argv = ["predict", "--config", "telechat2-tiny", "--load_checkpoint", str(checkpoint)]
    argv += ["--vocab-file", str(tiny_tokenizer_file), "--predict-data", PROMPT, "--max-new-tokens", "3"]
    argv += ["--do_sample", "--temperature", "1.0", "--top_k", "0", "--top_p", "1.0", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_predict_cli_reports_bad_input(capsys, tiny_tokenizer_file):
    assert main(["predict", "--config", "telechat2-tiny"]) == 2
    assert "--predict_data" in capsys.readouterr().err
    argv = ["predict", "--config", "no-such.yaml", "--predict_data", PROMPT, "--vocab_file", str(tiny_tokenizer_file)]
    assert main(argv) == 2
    assert "no-such.yaml" in capsys.readouterr().err
    argv = ["predict", "--config", "telechat2-tiny", "--predict_data", PROMPT, "--vocab_file", str(tiny_tokenizer_file)]
    assert main([*argv, "--stop", "hello world again"]) == 2
    assert "--stop 'hello world again'" in capsys.readouterr().err


@pytest.mark.slow
def test_interactive_chat_keeps_the_history(checkpoint, reference, tiny_tokenizer):
    config = GenerationConfig(max_new_tokens=4)
    model = load_model("telechat2-tiny", str(checkpoint))
    out = io.StringIO()
    assert chat_loop(model, tiny_tokenizer, config, None, io.StringIO("Hello there\nAnd 42?\n"), out) == 0
    budget = 64 - 4  # seq_length - max_new_tokens: the prompt budget chat_loop uses
    messages = [{"role": "user", "content": "Hello there"}]
    first = tiny_tokenizer.decode(generate(reference, chat_input_ids(tiny_tokenizer, messages, budget), config))
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And 42?"}]
    second = tiny_tokenizer.decode(generate(reference, chat_input_ids(tiny_tokenizer, messages, budget), config))
    transcript = out.getvalue()
    assert first.strip() and second.strip() and first != second
    assert f"bot> {first}\n" in transcript
    assert f"bot> {second}\n" in transcript
    assert transcript.count("user> ") == 3  # two questions, then EOF
