"""Weight conversion: Hugging Face safetensors <-> MindSpore checkpoint, streaming, bit-exact round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from telechat2 import cli
from telechat2.checkpoint_io import CheckpointError, CkptReader, CkptWriter, encode_value_header, numpy_dtype
from telechat2.configuration import TeleChat2Config
from telechat2.convert import convert_hf_to_ms
from telechat2.convert_reversed import convert_ms_to_hf, parse_size
from telechat2.weights import hf_config_dict, hf_shapes, ms_shapes
from tests.unit.tiny_model import save_tiny_checkpoint, tiny_config


def make_hf_checkpoint(directory: Path, config: TeleChat2Config, dtype: str = "float32", files: int = 2, seed=0):
    """A random Hugging Face-layout checkpoint in `files` safetensors shards plus config.json; returns its tensors."""
    rng = np.random.default_rng(seed)
    tensors = {
        name: rng.standard_normal(shape, dtype=np.float32).astype(numpy_dtype(dtype))
        for name, shape in hf_shapes(config).items()
    }
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    for i, part in enumerate(np.array_split(np.arange(len(names)), files)):
        save_file({names[j]: tensors[names[j]] for j in part}, str(directory / f"model-{i}.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config_dict(config)))
    return tensors


def read_hf_dir(directory: Path) -> dict[str, np.ndarray]:
    numpy_dtype("bfloat16")
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():  # noqa: SIM118
                out[name] = f.get_tensor(name)
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_value_framing_is_byte_identical_to_mindspore_protobuf():
    from mindspore.train.checkpoint_pb2 import Checkpoint

    for name, array in [("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4)), ("s", np.array(7, np.int32))]:
        message = Checkpoint()
        value = message.value.add()
        value.tag = name
        value.tensor.dims.extend(array.shape)
        value.tensor.tensor_type = "Float32" if array.dtype == np.float32 else "Int32"
        value.tensor.tensor_content = array.tobytes()
        ours = encode_value_header(name, array.shape, value.tensor.tensor_type, array.nbytes) + array.tobytes()
        assert ours == message.SerializeToString()


def test_sliced_tensors_load_in_mindspore_and_index_lazily(tmp_path):
    import mindspore as ms

    big = np.arange(3000, dtype=np.float32).reshape(30, 100)
    bf16 = big[:2].astype(numpy_dtype("bfloat16"))
    with CkptWriter(tmp_path / "x.ckpt", slice_bytes=1000) as writer:  # 3 + 10 slices for `big`
        writer.write("big", big.shape, big.dtype, [big[:7], big[7:]])
        writer.write("half", bf16.shape, bf16.dtype, [bf16])
    loaded = ms.load_checkpoint(str(tmp_path / "x.ckpt"))
    assert np.array_equal(loaded["big"].asnumpy(), big)
    assert loaded["half"].dtype == ms.bfloat16
    reader = CkptReader(tmp_path / "x.ckpt")
    assert len(reader.entries["big"].slices) == 13
    assert np.array_equal(reader.read_flat("big", 995, 10), big.reshape(-1)[995:1005])
    assert same_bits(reader.read("half"), bf16)
    assert not (tmp_path / "x.ckpt.partial").exists()


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(CheckpointError, match="needs"), CkptWriter(tmp_path / "y.ckpt") as writer:
        writer.write("w", (2, 2), np.float32, [np.zeros(3, np.float32)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("config", "qkv_concat"),
    [(tiny_config(), False), (tiny_config(), True), (tiny_config(num_experts=4, num_experts_per_tok=2), False)],
    ids=["dense", "dense-qkv_concat", "moe"],
)
def test_round_trip_is_bit_exact(tmp_path, config, qkv_concat):
    import mindspore as ms

    hf = make_hf_checkpoint(tmp_path / "hf", config)
    convert_hf_to_ms(tmp_path / "hf", tmp_path / "ms.ckpt", config, qkv_concat=qkv_concat)
    loaded = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(tmp_path / "ms.ckpt")).items()}
    assert {k: v.shape for k, v in loaded.items()} == ms_shapes(config, qkv_concat)

    summary = convert_ms_to_hf(tmp_path / "ms.ckpt", tmp_path / "back", config, max_shard_bytes=40_000)
    assert summary["shards"] > 1 and summary["layout"] == ("qkv_concat" if qkv_concat else "kv_concat")
    back = read_hf_dir(tmp_path / "back")
    assert back.keys() == hf.keys()
    assert all(same_bits(back[name], hf[name]) for name in hf)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["n_layer"] == config.num_layers


def test_layouts_place_heads_and_experts_as_the_facts_say(tmp_path):
    """key_value rows are [K_h0, V_h0, K_h1, V_h1]; w_qkv = [Q, K_h0, K_h1, V_h0, V_h1]; experts stack on axis 0."""
    import mindspore as ms

    dense, moe = tiny_config(), tiny_config(num_experts=4, num_experts_per_tok=2)
    hf = make_hf_checkpoint(tmp_path / "hf", dense)
    convert_hf_to_ms(tmp_path / "hf", tmp_path / "qkv.ckpt", dense, qkv_concat=True)
    w_qkv = ms.load_checkpoint(str(tmp_path / "qkv.ckpt"))["model.layers.1.attention.w_qkv.weight"].asnumpy()
    kv = hf["transformer.h.1.self_attention.key_value.weight"]
    d, h = dense.head_dim, dense.hidden_size  # 16, 64; two KV heads
    k_h0, v_h0, k_h1, v_h1 = kv[0:d], kv[d : 2 * d], kv[2 * d : 3 * d], kv[3 * d : 4 * d]
    expected = np.concatenate([hf["transformer.h.1.self_attention.query.weight"], k_h0, k_h1, v_h0, v_h1])
    assert np.array_equal(w_qkv, expected)
    gate_hidden = ms.load_checkpoint(str(tmp_path / "qkv.ckpt"))["model.layers.0.feed_forward.w_gate_hidden.weight"]
    assert np.array_equal(
        gate_hidden.asnumpy(),
        np.concatenate([hf["transformer.h.0.mlp.gate_proj.weight"], hf["transformer.h.0.mlp.up_proj.weight"]]),
    )

    hf_moe = make_hf_checkpoint(tmp_path / "hf_moe", moe)
    convert_hf_to_ms(tmp_path / "hf_moe", tmp_path / "moe.ckpt", moe)
    params = ms.load_checkpoint(str(tmp_path / "moe.ckpt"))
    assert np.array_equal(
        params["model.layers.0.feed_forward.ffn.w1.weight"].asnumpy()[2],
        hf_moe["transformer.h.0.mlp.local_experts.2.gate_proj.weight"],
    )
    bias = params["model.layers.1.feed_forward.ffn.w2.bias"].asnumpy()
    assert bias.shape == (1, 4, 1, h)
    assert np.array_equal(bias[0, 3, 0], hf_moe["transformer.h.1.mlp.local_experts.3.down_proj.bias"])


def test_bfloat16_round_trips_through_float32_exactly(tmp_path):
    config = tiny_config()
    hf = make_hf_checkpoint(tmp_path / "hf", config, dtype="bfloat16", files=1)
    convert_hf_to_ms(tmp_path / "hf", tmp_path / "f32.ckpt", config, dtype="float32")
    convert_hf_to_ms(tmp_path / "hf", tmp_path / "bf16.ckpt", config, dtype="keep")
    assert CkptReader(tmp_path / "f32.ckpt").entries["lm_head.weight"].tensor_type == "Float32"
    assert CkptReader(tmp_path / "bf16.ckpt").entries["lm_head.weight"].tensor_type == "BFloat16"
    convert_ms_to_hf(tmp_path / "f32.ckpt", tmp_path / "from_f32", config, dtype="bfloat16")
    convert_ms_to_hf(tmp_path / "bf16.ckpt", tmp_path / "from_bf16", config)
    for directory in ("from_f32", "from_bf16"):
        back = read_hf_dir(tmp_path / directory)
        assert all(same_bits(back[n], hf[n]) for n in hf), directory
    assert (tmp_path / "from_bf16" / "model.safetensors").exists()  # one shard: no index, as Hugging Face


def test_bad_checkpoints_are_named_and_nothing_is_written(tmp_path):
    config = tiny_config()
    make_hf_checkpoint(tmp_path / "hf", config, files=1)
    tensors = read_hf_dir(tmp_path / "hf")
    del tensors["transformer.h.1.mlp.up_proj.weight"]
    tensors["transformer.h.0.self_attention.key_value.weight"] = np.zeros((8, 64), np.float32)
    tensors["transformer.h.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "hf" / "model-0.safetensors"))
    with pytest.raises(CheckpointError) as err:
        convert_hf_to_ms(tmp_path / "hf", tmp_path / "out.ckpt", config)
    message = str(err.value)
    assert "1 missing tensor(s):\n    transformer.h.1.mlp.up_proj.weight" in message
    assert "unexpected tensor(s):\n    transformer.h.0.mlp.extra.weight" in message
    assert "transformer.h.0.self_attention.key_value.weight is [8, 64], expected [64, 64]" in message
    assert not list(tmp_path.glob("out.ckpt*"))


def test_reversed_names_missing_tensors_and_skips_training_state(tmp_path):
    config = tiny_config()
    make_hf_checkpoint(tmp_path / "hf", config, files=1)
    convert_hf_to_ms(tmp_path / "hf", tmp_path / "ms.ckpt", config)
    reader = CkptReader(tmp_path / "ms.ckpt")
    with CkptWriter(tmp_path / "train.ckpt") as writer:  # what a finetune run saves: weights + optimizer state
        for name in reader.names():
            if name != "model.layers.1.attention.wo.bias":
                writer.write(name, reader.entries[name].shape, np.float32, [reader.read(name)])
        writer.write("adam_m.lm_head.weight", (512, 64), np.float32, [np.zeros((512, 64), np.float32)])
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\):\n    model.layers.1.attention.wo.bias"):
        convert_ms_to_hf(tmp_path / "train.ckpt", tmp_path / "out", config)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))

    summary = convert_ms_to_hf(tmp_path / "ms.ckpt", tmp_path / "out", config)
    assert summary["skipped"] == 0
    with pytest.raises(CheckpointError, match="not an empty directory"):
        convert_ms_to_hf(tmp_path / "ms.ckpt", tmp_path / "out", config)


def test_corrupt_checkpoint_is_named(tmp_path):
    config = tiny_config()
    make_hf_checkpoint(tmp_path / "hf", config, files=1)
    convert_hf_to_ms(tmp_path / "hf", tmp_path / "ms.ckpt", config)
    data = (tmp_path / "ms.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint .*cut.ckpt: truncated"):
        CkptReader(tmp_path / "cut.ckpt")


def test_cli_convert_both_ways(tmp_path, capsys):
    config = tiny_config()
    hf = make_hf_checkpoint(tmp_path / "hf", config)
    assert (
        cli.main(["convert", "--torch_path", str(tmp_path / "hf"), "--mindspore_path", str(tmp_path / "a.ckpt")]) == 0
    )
    assert "layout kv_concat" in capsys.readouterr().out
    code = cli.main(
        [
            "convert",
            "--torch-path",
            str(tmp_path / "hf"),
            "--mindspore-path",
            str(tmp_path / "b.ckpt"),
            "--qkv_concat",
            "True",
        ]
    )
    assert code == 0 and "attention.w_qkv.weight" in " ".join(CkptReader(tmp_path / "b.ckpt").names())
    code = cli.main(
        [
            "convert-reversed",
            "--mindspore_path",
            str(tmp_path / "b.ckpt"),
            "--torch_path",
            str(tmp_path / "c"),
            "--config_json",
            str(tmp_path / "hf" / "config.json"),
        ]
    )
    assert code == 0 and "qkv_concat layout" in capsys.readouterr().out
    back = read_hf_dir(tmp_path / "c")
    assert all(same_bits(back[n], hf[n]) for n in hf)
    code = cli.main(
        ["convert-reversed", "--mindspore_path", str(tmp_path / "a.ckpt"), "--torch_path", str(tmp_path / "d")]
    )
    assert code == 1 and "architecture is unknown" in capsys.readouterr().err


def test_model_name_gives_the_architecture(tmp_path):
    from telechat2.configs import architecture
    from telechat2.convert import resolve_architecture

    tiny = architecture("telechat2-tiny")
    assert resolve_architecture("telechat2-tiny", tmp_path / "absent.json") == tiny
    make_hf_checkpoint(tmp_path / "hf", tiny, files=1)
    (tmp_path / "hf" / "config.json").unlink()
    argv = ["convert", "--torch_path", str(tmp_path / "hf"), "--mindspore_path", str(tmp_path / "t.ckpt")]
    assert cli.main([*argv, "--model", "telechat2-tiny"]) == 0
    assert cli.main(argv) == 1


@pytest.mark.parametrize(
    "config",
    [
        tiny_config(),
        tiny_config(num_experts=4, num_experts_per_tok=2),
        tiny_config(qkv_concat=True),
        tiny_config(qkv_concat=True, num_experts=4, num_experts_per_tok=2),
    ],
    ids=["dense", "moe", "qkv_concat", "qkv_concat_moe"],
)
def test_parameter_names_match_the_model(config):
    """The model and the converter agree on every name and shape (names from the facts file)."""
    from telechat2.modeling import TeleChat2ForCausalLM

    model = TeleChat2ForCausalLM(config)
    names = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    assert names == ms_shapes(config, config.qkv_concat)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_both_layouts_load_into_the_model_and_compute_the_same_logits(tmp_path, moe):
    """`convert --qkv_concat` output loads into a qkv_concat model with nothing missing or left over."""
    import mindspore as ms

    from telechat2.modeling import TeleChat2ForCausalLM

    overrides = {"num_experts": 4, "num_experts_per_tok": 2} if moe else {}
    make_hf_checkpoint(tmp_path / "hf", tiny_config(**overrides), files=1)
    ids = ms.Tensor(np.random.default_rng(3).integers(4, 512, (1, 7)), ms.int32)
    logits = {}
    for qkv_concat in (False, True):
        config = tiny_config(qkv_concat=qkv_concat, **overrides)
        convert_hf_to_ms(tmp_path / "hf", tmp_path / f"{qkv_concat}.ckpt", config, qkv_concat=qkv_concat)
        model = TeleChat2ForCausalLM(config)
        not_loaded, unused = ms.load_param_into_net(model, ms.load_checkpoint(str(tmp_path / f"{qkv_concat}.ckpt")))
        assert (not_loaded, unused) == ([], [])
        model.set_train(False)
        logits[qkv_concat] = model(ids).asnumpy()
    assert np.abs(logits[False]).max() > 1e-2  # weights really loaded (random init would be near zero)
    np.testing.assert_allclose(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == 1000
    with pytest.raises(CheckpointError, match="max_shard_size"):
        parse_size("lots")


def test_torch_bin_without_torch_says_what_to_do(tmp_path):
    try:  # torch is not a dependency; when it is installed, .bin files convert instead
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch is installed")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.*need torch"):
        convert_hf_to_ms(tmp_path / "hf", tmp_path / "x.ckpt", tiny_config())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_convert_rejects_non_finite_values_naming_the_tensor(tmp_path, bad):
    config = tiny_config()
    tensors = make_hf_checkpoint(tmp_path / "hf", config, files=1)
    tensors["transformer.h.1.self_attention.key_value.weight"][7, 3] = bad
    save_file(tensors, str(tmp_path / "hf" / "model-0.safetensors"))
    for qkv_concat in (False, True):
        with pytest.raises(CheckpointError) as err:
            convert_hf_to_ms(tmp_path / "hf", tmp_path / "out.ckpt", config, qkv_concat=qkv_concat)
        assert "transformer.h.1.self_attention.key_value.weight (in model-0.safetensors, for model.layers.1." in str(
            err.value
        )
        assert "has 1 non-finite value(s) (NaN/Inf)" in str(err.value)
        assert not list(tmp_path.glob("out.ckpt*"))
    args = ["convert", "--torch_path", str(tmp_path / "hf"), "--mindspore_path", str(tmp_path / "o.ckpt")]
    assert cli.main(args) == 1
    assert not list(tmp_path.glob("o.ckpt*"))


def test_convert_names_a_cast_that_overflows(tmp_path):
    config = tiny_config()
    tensors = make_hf_checkpoint(tmp_path / "hf", config, files=1)
    tensors["lm_head.weight"][0, 0] = 1e6  # finite in float32, Inf in float16
    save_file(tensors, str(tmp_path / "hf" / "model-0.safetensors"))
    with pytest.raises(CheckpointError, match=r"lm_head.weight .*: 1 value\(s\) overflow float16 .*wider --dtype"):
        convert_hf_to_ms(tmp_path / "hf", tmp_path / "out.ckpt", config, dtype="float16")
    assert not list(tmp_path.glob("out.ckpt*"))


def test_bfloat16_non_finite_is_found(tmp_path):
    config = tiny_config()
    tensors = make_hf_checkpoint(tmp_path / "hf", config, dtype="bfloat16", files=1)
    tensors["transformer.ln_f.weight"][5] = np.nan
    save_file(tensors, str(tmp_path / "hf" / "model-0.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer.ln_f.weight .*non-finite"):
        convert_hf_to_ms(tmp_path / "hf", tmp_path / "out.ckpt", config, dtype="keep")


@pytest.mark.parametrize("qkv_concat", [False, True])
def test_reversed_rejects_non_finite_values_naming_the_tensor(tmp_path, qkv_concat):
    config = tiny_config()
    make_hf_checkpoint(tmp_path / "hf", config, files=1)
    convert_hf_to_ms(tmp_path / "hf", tmp_path / "good.ckpt", config, qkv_concat=qkv_concat)
    reader = CkptReader(tmp_path / "good.ckpt")
    target = "model.layers.0.attention.w_qkv.weight" if qkv_concat else "model.layers.0.attention.wk_v.weight"
    with CkptWriter(tmp_path / "bad.ckpt") as writer:
        for name, value in reader.iter_tensors():
            if name == target:
                value = value.copy()
                value[-1, -1] = np.inf  # the last V row: lands in key_value
            writer.write(name, value.shape, value.dtype, [value])
    with pytest.raises(CheckpointError) as err:
        convert_ms_to_hf(tmp_path / "bad.ckpt", tmp_path / "back", config)
    assert f"transformer.h.0.self_attention.key_value.weight (from {target} in " in str(err.value)
    assert "has 1 non-finite value(s) (NaN/Inf)" in str(err.value)
    assert not (tmp_path / "back").exists() and not list(tmp_path.glob(".back.partial-*"))


def test_non_finite_counts_across_chunks(monkeypatch):
    import telechat2.checkpoint_io as checkpoint_io

    monkeypatch.setattr(checkpoint_io, "FINITE_CHECK_VALUES", 7)
    values = np.zeros((5, 9), np.float32)
    values[2, 1], values[4, 8] = np.nan, -np.inf
    assert checkpoint_io.non_finite(values) == (2, 19)
    assert checkpoint_io.non_finite(values.astype(numpy_dtype("bfloat16"))) == (2, 19)
    assert checkpoint_io.non_finite(np.zeros(3, np.float32)) is None
    assert checkpoint_io.non_finite(np.arange(3)) is None  # integers are never non-finite


# Keys the official code reads from config.json (Tele-AI/TeleChat2): the arguments of `Telechat2Config.__init__`
# in configuration_telechat2.py, and the attributes modeling_telechat2.py reads that the config class does not
# define (`RotaryEmbedding.get_ntk_alpha`: config.base_seqlen; `TelechatAttention.forward`: config.flash_attn).
OFFICIAL_CONFIG_KEYS = {
    "vocab_size", "hidden_size", "n_layer", "n_head", "layer_norm_epsilon", "initializer_range", "use_cache",
    "bos_token_id", "eos_token_id", "apply_residual_connection_post_layernorm", "hidden_dropout",
    "attention_dropout", "ffn_hidden_size", "training_seqlen", "logn", "embed_layernorm", "num_key_value_heads",
    "hidden_act", "base_seqlen", "flash_attn",
}  # fmt: skip


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_convert_reversed_without_config_json_writes_a_config_the_official_code_loads(tmp_path, capsys, dtype):
    from telechat2.convert import architecture_from_hf_config

    _, checkpoint = save_tiny_checkpoint(tmp_path / "tiny.ckpt", seed=3)
    argv = ["convert-reversed", "--mindspore_path", str(checkpoint), "--torch_path", str(tmp_path / "hf")]
    assert cli.main([*argv, "--model", "telechat2-tiny", "--dtype", dtype]) == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert not OFFICIAL_CONFIG_KEYS - set(written), OFFICIAL_CONFIG_KEYS - set(written)
    assert written["auto_map"] == {
        "AutoConfig": "configuration_telechat2.Telechat2Config",
        "AutoModelForCausalLM": "modeling_telechat2.Telechat2ForCausalLM",
    }
    assert written["model_type"] == "telechat" and written["architectures"] == ["TeleChat2ForCausalLM"]
    tiny = tiny_config()
    assert (written["n_layer"], written["n_head"], written["num_key_value_heads"]) == (2, 4, 2)
    assert (written["ffn_hidden_size"], written["training_seqlen"], written["base_seqlen"]) == (128, 64, 64)
    assert written["embed_layernorm"] is False and written["apply_residual_connection_post_layernorm"] is False
    assert written["tie_word_embeddings"] is False and written["hidden_dropout"] == 0.0
    assert written["torch_dtype"] == ("float32" if dtype == "keep" else "bfloat16")
    assert written["flash_attn"] is (dtype == "bfloat16")  # the official flash path needs half precision
    architecture = architecture_from_hf_config(written)
    assert (architecture.hidden_size, architecture.num_layers, architecture.n_kv_heads) == (
        tiny.hidden_size, tiny.num_layers, tiny.n_kv_heads,
    )  # fmt: skip
