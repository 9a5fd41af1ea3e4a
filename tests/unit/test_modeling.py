"""TeleChat2 model: checkpoint names, rotary/NTK helpers, incremental decoding, loss, MoE, layouts, training."""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest
from tiny_model import build_tiny_model, random_weights, tiny_config

from telechat2.modeling import (
    TeleChat2ForCausalLM,
    TeleChat2MoE,
    TeleChat2RMSNorm,
    apply_rotary_pos_emb,
    dynamic_ntk_base_and_mscale,
    load_balancing_loss,
    rotary_cos_sin,
)


@pytest.fixture(autouse=True)
def _pynative_mode():
    """Eager execution, whatever mode an earlier test left behind (generation refuses graph mode)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _ids(rng: np.random.Generator, shape: tuple[int, int], low: int = 4) -> ms.Tensor:
    return ms.Tensor(rng.integers(low, 512, shape), ms.int32)


# -- parameter names: the seed's converted checkpoints must load without renaming -------------------------------------


def test_dense_parameter_names_and_shapes_follow_the_mindformers_research_layout():
    model = TeleChat2ForCausalLM(tiny_config())
    shapes = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    expected = {
        "model.tok_embeddings.embedding_weight": (512, 64),
        "model.norm_out.weight": (64,),
        "lm_head.weight": (512, 64),
    }
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        expected |= {
            prefix + "attention_norm.weight": (64,),
            prefix + "attention.wq.weight": (64, 64),
            prefix + "attention.wk_v.weight": (2 * 2 * 16, 64),  # 2 * kv_heads * head_dim
            prefix + "attention.wo.weight": (64, 64),
            prefix + "attention.wo.bias": (64,),
            prefix + "ffn_norm.weight": (64,),
            prefix + "feed_forward.w1.weight": (128, 64),
            prefix + "feed_forward.w3.weight": (128, 64),
            prefix + "feed_forward.w2.weight": (64, 128),
            prefix + "feed_forward.w2.bias": (64,),
        }
    assert shapes == expected


def test_moe_and_qkv_concat_parameter_names():
    moe = TeleChat2ForCausalLM(tiny_config(num_experts=4, num_experts_per_tok=2, num_layers=1))
    shapes = {name: tuple(p.shape) for name, p in moe.parameters_and_names() if ".feed_forward." in name}
    assert shapes == {
        "model.layers.0.feed_forward.router.dense.weight": (4, 64),
        "model.layers.0.feed_forward.ffn.w1.weight": (4, 128, 64),
        "model.layers.0.feed_forward.ffn.w3.weight": (4, 128, 64),
        "model.layers.0.feed_forward.ffn.w2.weight": (4, 64, 128),
        "model.layers.0.feed_forward.ffn.w2.bias": (1, 4, 1, 64),
    }
    assert dict(moe.parameters_and_names())["model.layers.0.feed_forward.router.dense.weight"].dtype == ms.float32
    fused = TeleChat2ForCausalLM(tiny_config(qkv_concat=True, num_layers=1))
    fused_shapes = {n: tuple(p.shape) for n, p in fused.parameters_and_names() if ".layers." in n}
    assert fused_shapes == {
        "model.layers.0.attention_norm.weight": (64,),
        "model.layers.0.attention.w_qkv.weight": (64 + 2 * 32, 64),  # Q, then K of all heads, then V
        "model.layers.0.attention.wo.weight": (64, 64),
        "model.layers.0.attention.wo.bias": (64,),
        "model.layers.0.ffn_norm.weight": (64,),
        "model.layers.0.feed_forward.w_gate_hidden.weight": (2 * 128, 64),  # w1 (gate) rows, then w3 (up) rows
        "model.layers.0.feed_forward.w2.weight": (64, 128),
        "model.layers.0.feed_forward.w2.bias": (64,),
    }
    fused_moe = TeleChat2ForCausalLM(tiny_config(qkv_concat=True, num_experts=4, num_experts_per_tok=2, num_layers=1))
    moe_names = {n for n, _ in fused_moe.parameters_and_names() if ".feed_forward." in n}
    assert moe_names == {f"model.layers.0.feed_forward.{n}" for n in ("router.dense.weight", *(
        f"ffn.{w}.weight" for w in ("w1", "w3", "w2")), "ffn.w2.bias")}  # experts stay stacked  # fmt: skip


def test_initialisation_uses_std_0_0048_and_zero_biases_unit_norms():
    model = TeleChat2ForCausalLM(tiny_config(vocab_size=4096))
    params = {name: p.asnumpy() for name, p in model.parameters_and_names()}
    assert params["model.tok_embeddings.embedding_weight"].std() == pytest.approx(0.0048, rel=0.05)
    assert params["lm_head.weight"].std() == pytest.approx(0.0048, rel=0.05)
    assert not params["model.layers.0.attention.wo.bias"].any()
    assert (params["model.layers.1.ffn_norm.weight"] == 1).all()


# -- rotary embedding and dynamic NTK ----------------------------------------------------------------------------------


def test_dynamic_ntk_base_and_mscale_follow_the_formula():
    cfg = tiny_config(
        hidden_size=1024, num_heads=8, n_kv_heads=8, extend_method="DYNAMIC_NTK", training_seqlen=8192,
        max_position_embedding=8192, seq_length=16384,
    )  # fmt: skip
    assert cfg.head_dim == 128
    # L = 16384: log2(16384 / 8192) + 1 = 2 -> alpha = 2^2 - 1 = 3; mscale = 1 + 0.1 ln 2
    base, mscale = dynamic_ntk_base_and_mscale(16384, cfg)
    assert base == pytest.approx(10000 * 3 ** (128 / 126))
    assert mscale == pytest.approx(1 + 0.1 * math.log(2))
    # L = 12000: log2(1.46) + 1 = 1.55 -> ceil 2 -> alpha 3; mscale from 12000 / 8192
    base, mscale = dynamic_ntk_base_and_mscale(12000, cfg)
    assert base == pytest.approx(10000 * 3 ** (128 / 126))
    assert mscale == pytest.approx(1 + 0.1 * math.log(12000 / 8192))
    # L = 32768: log2(4) + 1 = 3 -> alpha 7
    assert dynamic_ntk_base_and_mscale(32768, cfg)[0] == pytest.approx(10000 * 7 ** (128 / 126))
    # within the trained length: L = max(seq, training) = 8192 -> alpha = 2^1 - 1 = 1, no scaling
    assert dynamic_ntk_base_and_mscale(4096, cfg) == (10000.0, 1.0)
    # without DYNAMIC_NTK nothing changes, however long
    assert dynamic_ntk_base_and_mscale(32768, tiny_config()) == (10000.0, 1.0)


def test_model_rotary_tables_use_the_ntk_base_past_the_trained_length():
    cfg = tiny_config(extend_method="DYNAMIC_NTK", training_seqlen=32, max_position_embedding=32, seq_length=64)
    model = TeleChat2ForCausalLM(cfg)
    head_dim = 16
    base = 10000 * 3 ** (head_dim / (head_dim - 2))  # L = 64 = 2 * base_seqlen -> alpha 3
    mscale = 1 + 0.1 * math.log(2)
    position, i = 37, 5  # angle of position p, frequency pair i: p / base^(2i / D), repeated in both halves
    angle = position / base ** (2 * i / head_dim)
    cos = model.model.rope_cos.asnumpy()
    sin = model.model.rope_sin.asnumpy()
    assert cos[position, i] == pytest.approx(math.cos(angle) * mscale, rel=1e-5)
    assert cos[position, i + head_dim // 2] == pytest.approx(math.cos(angle) * mscale, rel=1e-5)
    assert sin[position, i] == pytest.approx(math.sin(angle) * mscale, rel=1e-5)
    plain = TeleChat2ForCausalLM(tiny_config())
    assert plain.model.rope_cos.asnumpy()[position, i] == pytest.approx(math.cos(position / 10000 ** (2 * i / 16)))


def test_rotary_is_rotate_half_not_interleaved():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 3, 8)).astype(np.float32)
    cos, sin = rotary_cos_sin(3, 8, 10000.0)
    out = apply_rotary_pos_emb(ms.Tensor(x), ms.Tensor(cos), ms.Tensor(sin)).asnumpy()
    # dimension j pairs with j + 4 (GPT-NeoX), rotating by angle pos * inv_freq[j]
    pos, j = 2, 1
    theta = pos / 10000 ** (2 * j / 8)
    x1, x2 = x[0, 0, pos, j], x[0, 0, pos, j + 4]
    assert out[0, 0, pos, j] == pytest.approx(x1 * math.cos(theta) - x2 * math.sin(theta), abs=1e-6)
    assert out[0, 0, pos, j + 4] == pytest.approx(x2 * math.cos(theta) + x1 * math.sin(theta), abs=1e-6)


def test_rms_norm_matches_numpy_and_returns_the_input_dtype():
    norm = TeleChat2RMSNorm(8, tiny_config())
    weight = np.linspace(0.5, 1.5, 8).astype(np.float32)
    norm.weight.set_data(ms.Tensor(weight))
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(norm(ms.Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    assert norm(ms.Tensor(x, ms.float16)).dtype == ms.float16


# -- forward passes ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model(seed=0)


def test_incremental_decoding_with_the_cache_matches_the_full_forward(tiny_model):
    ids = _ids(np.random.default_rng(2), (2, 13))
    full = tiny_model(ids).asnumpy()
    first, cache = tiny_model.forward(ids[:, :6])
    pieces = [first.asnumpy()]
    for pos in range(6, 13):
        logits, cache = tiny_model.forward(ids[:, pos : pos + 1], cache, pos)
        pieces.append(logits.asnumpy())
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-4, atol=1e-5)
    assert cache[0][0].shape == (2, 2, 13, 16)  # [B, kv_heads, T, head_dim], before the GQA repeat
    assert np.abs(full[0, -1] - full[1, -1]).max() > 1e-3  # rows differ: the batch is not collapsed


def test_compiled_static_cache_steps_match_the_growing_cache(tiny_model):
    names = [name for name, _ in tiny_model.parameters_and_names()]
    ids = _ids(np.random.default_rng(8), (1, 12)).asnumpy()[0].tolist()
    decoder = tiny_model.static_decoder()
    assert tiny_model.static_decoder() is decoder  # compiled once per model
    _, cache = tiny_model.forward(ms.Tensor([ids[:5]], ms.int32))
    keys, values = decoder.empty_cache(cache)
    for position in range(5, 12):
        static_logits, keys, values = decoder.step(ids[position], position, keys, values)
        expected, cache = tiny_model.forward(ms.Tensor([[ids[position]]], ms.int32), cache, position)
        np.testing.assert_allclose(static_logits.asnumpy(), expected.asnumpy(), rtol=1e-4, atol=1e-5)
    assert keys[0].shape == (1, 2, 64, 16)  # [B, kv_heads, seq_length, head_dim]
    np.testing.assert_allclose(keys[1].asnumpy()[:, :, :12], cache[1][0].asnumpy(), rtol=1e-5, atol=1e-6)
    assert not keys[1].asnumpy()[:, :, 12:].any()  # positions not reached yet stay empty
    assert [name for name, _ in tiny_model.parameters_and_names()] == names  # checkpoint names untouched


def test_padding_mask_hides_left_padding_from_real_tokens(tiny_model):
    """RoPE scores depend on relative positions only, so masked left padding must not change the real tokens."""
    ids = _ids(np.random.default_rng(3), (1, 6)).asnumpy()
    padded = ms.Tensor(np.concatenate([np.full((1, 3), 3), ids], axis=1), ms.int32)
    mask = ms.Tensor(np.concatenate([np.zeros((1, 3)), np.ones((1, 6))], axis=1), ms.int32)
    alone, _ = tiny_model.forward(ms.Tensor(ids, ms.int32), last_only=True)
    masked, _ = tiny_model.forward(padded, attention_mask=mask, last_only=True)
    unmasked, _ = tiny_model.forward(padded, last_only=True)
    assert alone.shape == (1, 1, 512)
    np.testing.assert_allclose(masked.asnumpy(), alone.asnumpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(unmasked.asnumpy() - alone.asnumpy()).max() > 1e-3


def test_loss_is_masked_cross_entropy_of_shifted_labels(tiny_model):
    rng = np.random.default_rng(4)
    ids = rng.integers(4, 512, (2, 10))
    ids[0, :3] = 3  # left padding
    labels = ids.copy()
    labels[:, :5] = -100  # prompt tokens are not trained
    labels[0, :3] = -100
    ids[1, 6] = 3  # a pad input whose next label is real: masked by the `tokens != pad` rule only
    loss = float(tiny_model(ms.Tensor(ids, ms.int32), ms.Tensor(labels, ms.int32)).asnumpy())
    logits = tiny_model(ms.Tensor(ids[:, :-1], ms.int32)).asnumpy().astype(np.float64)
    tokens, targets = ids[:, :-1], labels[:, 1:]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    mask = (tokens != 3) & (targets != -100)
    picked = np.take_along_axis(log_probs, np.where(mask, targets, 0)[..., None], -1)[..., 0]
    expected = -(picked * mask).sum() / mask.sum()
    assert mask.sum() == 2 * 5 - 1
    assert loss == pytest.approx(expected, rel=1e-5)


def test_qkv_concat_layout_computes_the_same_function():
    """w_qkv = concat(Q, K of every head, V of every head), de-interleaved from wk_v's [K_h0, V_h0, K_h1, V_h1];
    w_gate_hidden = concat(w1, w3)."""
    model = build_tiny_model(seed=5)
    fused = TeleChat2ForCausalLM(tiny_config(qkv_concat=True))
    fused.set_train(False)
    source = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    converted = {}
    for name, value in source.items():
        if name.endswith("attention.wq.weight"):
            kv = source[name.replace("wq", "wk_v")].reshape(2, 2 * 16, 64)  # [kv_heads, K;V, H]
            keys, values = kv[:, :16].reshape(32, 64), kv[:, 16:].reshape(32, 64)
            converted[name.replace("wq", "w_qkv")] = np.concatenate([value, keys, values])
        elif name.endswith("feed_forward.w1.weight"):
            converted[name.replace("w1", "w_gate_hidden")] = np.concatenate([value, source[name.replace("w1", "w3")]])
        elif not name.endswith(("wk_v.weight", "feed_forward.w3.weight")):
            converted[name] = value
    for name, param in fused.parameters_and_names():
        param.set_data(ms.Tensor(converted[name]))
    ids = _ids(np.random.default_rng(6), (1, 9))
    np.testing.assert_allclose(fused(ids).asnumpy(), model(ids).asnumpy(), rtol=1e-5, atol=1e-5)


def test_without_gqa_the_model_runs_and_caches_all_heads():
    model = build_tiny_model(seed=7, n_kv_heads=4)
    _, cache = model.forward(_ids(np.random.default_rng(7), (1, 5)))
    assert cache[1][1].shape == (1, 4, 5, 16)


# -- mixture of experts ------------------------------------------------------------------------------------------------


def _numpy_moe(x: np.ndarray, params: dict[str, np.ndarray], top_k: int) -> tuple[np.ndarray, float]:
    """Reference: softmax router, top-k, renormalised weights, SwiGLU experts with down bias, Switch aux loss."""
    tokens = x.reshape(-1, x.shape[-1]).astype(np.float64)
    scores = tokens @ params["router.dense.weight"].T
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(tokens)
    chosen = np.zeros_like(probs)
    for m, row in enumerate(probs):
        top = np.argsort(-row)[:top_k]
        weights = row[top] / row[top].sum()
        chosen[m, top] = 1
        for e, w in zip(top, weights, strict=True):
            gate = tokens[m] @ params["ffn.w1.weight"][e].T
            up = tokens[m] @ params["ffn.w3.weight"][e].T
            hidden = gate / (1 + np.exp(-gate)) * up
            out[m] += w * (hidden @ params["ffn.w2.weight"][e].T + params["ffn.w2.bias"][0, e, 0])
    experts = probs.shape[-1]
    aux = experts * ((chosen.sum(0) / chosen.sum()) * probs.mean(0)).sum()
    return out.reshape(x.shape), aux


def test_moe_layer_matches_a_numpy_reference_with_renormalised_top_k():
    cfg = tiny_config(num_experts=4, num_experts_per_tok=2)
    moe = TeleChat2MoE(cfg)
    params = random_weights(moe, seed=8, std=0.2, bias_std=0.3)
    x = np.random.default_rng(9).standard_normal((2, 5, 64)).astype(np.float32)
    out, aux = moe(ms.Tensor(x))
    expected_out, expected_aux = _numpy_moe(x, params, top_k=2)
    np.testing.assert_allclose(out.asnumpy(), expected_out, rtol=1e-4, atol=1e-5)
    assert float(aux.asnumpy()) == pytest.approx(expected_aux, rel=1e-5)


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_skewed():
    balanced = load_balancing_loss(ms.Tensor(np.full((4, 4), 0.25), ms.float32), ms.Tensor(np.eye(4), ms.float32))
    assert float(balanced.asnumpy()) == pytest.approx(1.0)
    skewed_probs = np.tile([0.7, 0.1, 0.1, 0.1], (4, 1))
    skewed_mask = np.tile([1.0, 0, 0, 0], (4, 1))
    skewed = load_balancing_loss(ms.Tensor(skewed_probs, ms.float32), ms.Tensor(skewed_mask, ms.float32))
    assert float(skewed.asnumpy()) == pytest.approx(4 * 0.7)


def test_moe_training_loss_includes_the_weighted_aux_loss():
    model = build_tiny_model(seed=10, num_experts=4, num_experts_per_tok=2, aux_loss_factor=0.5)
    ids = _ids(np.random.default_rng(11), (1, 8))
    with_aux = float(model(ids, ids).asnumpy())
    model.aux_loss_factor = 0.0
    without = float(model(ids, ids).asnumpy())
    _, _, aux = model.model(ids[:, :-1])
    assert with_aux - without == pytest.approx(0.5 * float(aux.asnumpy()), rel=1e-4)
    assert float(aux.asnumpy()) >= 2 * 1.0 - 1e-4  # two layers, each >= 1 (its minimum, when balanced)


# -- training in graph mode (what MindFormers' Trainer uses on CPU) -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_graph_mode_training_steps_reduce_the_loss(moe):
    overrides = {"num_experts": 4, "num_experts_per_tok": 2} if moe else {}
    model = build_tiny_model(seed=12, **overrides)
    ids = _ids(np.random.default_rng(13), (2, 17))
    pynative_loss = float(model(ids, ids).asnumpy())
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        model.set_train(True)
        optimizer = ms.nn.AdamWeightDecay(model.trainable_params(), learning_rate=1e-2)
        step = ms.nn.TrainOneStepCell(model, optimizer)
        losses = [float(step(ids, ids).asnumpy()) for _ in range(6)]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert losses[0] == pytest.approx(pynative_loss, rel=1e-4)  # graph and PyNative compute the same loss
    assert losses[-1] < 0.7 * losses[0]
