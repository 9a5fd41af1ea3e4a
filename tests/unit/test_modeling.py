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
    capacity_keep_mask,
    dynamic_ntk_base_and_mscale,
    expert_capacity,
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
    # without DYNAMIC_NTK the same: the official model always applies it (its NTK branch is `if True:`)
    assert dynamic_ntk_base_and_mscale(32768, tiny_config()) == dynamic_ntk_base_and_mscale(
        32768, tiny_config(extend_method="DYNAMIC_NTK")
    )
    assert dynamic_ntk_base_and_mscale(32768, tiny_config())[0] == pytest.approx(10000 * 1023 ** (16 / 14))
    assert dynamic_ntk_base_and_mscale(32, tiny_config()) == (10000.0, 1.0)  # within training_seqlen 64


def test_model_rotary_tables_use_the_ntk_base_past_the_trained_length():
    cfg = tiny_config(extend_method="DYNAMIC_NTK", training_seqlen=32, max_position_embedding=32, seq_length=64)
    model = TeleChat2ForCausalLM(cfg)
    head_dim = 16
    base = 10000 * 3 ** (head_dim / (head_dim - 2))  # L = 64 = 2 * base_seqlen -> alpha 3
    mscale = 1 + 0.1 * math.log(2)
    position, i = 37, 5  # angle of position p, frequency pair i: p / base^(2i / D), repeated in both halves
    angle = position / base ** (2 * i / head_dim)
    cos, sin = (table.asnumpy() for table in model.model.rotary(0, 64))  # a sequence of 64 tokens
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


def _numpy_moe(
    x: np.ndarray, params: dict[str, np.ndarray], top_k: int, capacity: int | None = None
) -> tuple[np.ndarray, float]:
    """Reference: softmax router, top-k, renormalised weights, SwiGLU experts with down bias, Switch aux loss;
    with `capacity`, choices over it dropped (`_numpy_keep`) and the kept weights left as they are."""
    tokens = x.reshape(-1, x.shape[-1]).astype(np.float64)
    scores = tokens @ params["router.dense.weight"].T
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(tokens)
    chosen = np.zeros_like(probs)
    tops = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    keep = np.ones(tops.shape) if capacity is None else _numpy_keep(tops, probs.shape[-1], capacity)
    for m, row in enumerate(probs):
        top = tops[m]
        weights = row[top] / row[top].sum() * keep[m]
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


# -- MoE capacity in training: MindFormers TopkRouterV2 (enable_sdrop False, the 39B-A12B yamls' router) ----------


def _numpy_keep(top_experts: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
    """MindFormers `_maskout_overflowed_tokens_sort_kdrop`, as loops: choices queued round by round (every token's
    first choice, then every second one, ...), tokens in order; an expert keeps the first `capacity`."""
    taken = np.zeros(num_experts, int)
    keep = np.zeros(top_experts.shape)
    for j in range(top_experts.shape[1]):
        for m in range(top_experts.shape[0]):
            taken[top_experts[m, j]] += 1
            keep[m, j] = taken[top_experts[m, j]] <= capacity
    return keep


def test_expert_capacity_is_mindformers_formula():
    assert expert_capacity(32, 2, 1.2, 4) == 20  # ceil(2 * 32 * 1.2 / 4)
    assert expert_capacity(8192, 4, 1.2, 16) == 2458  # 39B-A12B, one 8192-token sequence
    assert expert_capacity(3, 4, 1.2, 2) == 3  # never more than the tokens


def test_capacity_keep_mask_serves_first_choices_first_then_tokens_in_order():
    top = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [0, 1], [0, 1]])
    keep = capacity_keep_mask(ms.Tensor(top, ms.int32), 2, 3).asnumpy()
    # expert 0 takes the first choices of tokens 0, 1, 2 (full); expert 1 token 3's first choice, then the second
    # choices of tokens 0 and 1 (full); everything after is dropped
    np.testing.assert_array_equal(keep, [[1, 1], [1, 1], [1, 0], [1, 0], [0, 0], [0, 0]])
    rng = np.random.default_rng(40)
    top = np.stack([rng.choice(8, 3, replace=False) for _ in range(50)])
    keep = capacity_keep_mask(ms.Tensor(top, ms.int32), 8, 12).asnumpy()
    np.testing.assert_array_equal(keep, _numpy_keep(top, 8, 12))
    assert 0 < keep.sum() < keep.size


def _skewed_moe(capacity_factor: float) -> tuple[TeleChat2MoE, dict[str, np.ndarray]]:
    """Tiny MoE (4 experts, top 2) whose router sends most tokens to expert 0 first."""
    moe = TeleChat2MoE(tiny_config(num_experts=4, num_experts_per_tok=2, capacity_factor=capacity_factor))
    params = random_weights(moe, seed=41, std=0.2, bias_std=0.3)
    params["router.dense.weight"][0] += 0.5  # x has a positive mean below: expert 0 scores highest
    moe.router.dense.weight.set_data(ms.Tensor(params["router.dense.weight"]))
    return moe, params


def test_moe_drops_choices_over_capacity_in_training_and_nothing_in_inference():
    moe, params = _skewed_moe(1.2)
    x = (np.random.default_rng(42).standard_normal((2, 5, 64)) + 0.3).astype(np.float32)  # M = 10 tokens
    eval_out = moe(ms.Tensor(x))[0].asnumpy()
    np.testing.assert_allclose(eval_out, _numpy_moe(x, params, top_k=2)[0], rtol=1e-4, atol=1e-5)
    moe.set_train(True)
    train_out = moe(ms.Tensor(x))[0].asnumpy()
    capacity = expert_capacity(10, 2, 1.2, 4)  # 6
    expected = _numpy_moe(x, params, top_k=2, capacity=capacity)[0]
    np.testing.assert_allclose(train_out, expected, rtol=1e-4, atol=1e-5)
    dropped = np.abs(train_out - eval_out).reshape(10, 64).max(-1) > 1e-5
    assert 0 < dropped.sum() < 10  # some tokens lost a choice: expert 0 took only its first 6 first choices
    assert not dropped[:capacity].any()


def test_a_token_that_loses_every_choice_gets_no_expert_output():
    moe, params = _skewed_moe(0.2)  # capacity ceil(2 * 10 * 0.2 / 4) = 1 choice per expert
    moe.set_train(True)
    x = (np.random.default_rng(43).standard_normal((1, 10, 64)) + 0.3).astype(np.float32)
    out = moe(ms.Tensor(x))[0].asnumpy()[0]
    served = np.abs(out).max(-1) > 0
    assert served.sum() <= 4 * 1 * 2  # at most capacity choices per expert, each serving one token
    assert (~served).any()  # the others: exactly zero, the residual carries them
    np.testing.assert_allclose(out, _numpy_moe(x, params, top_k=2, capacity=1)[0][0], rtol=1e-4, atol=1e-5)


def test_moe_training_loss_with_capacity_dropping_differs_from_dropless():
    """The figure in docs/telechat2-cli.md: the same tiny MoE model and batch, loss in training mode at
    capacity_factor 1.2 against capacity_factor 0 (no dropping)."""
    losses = {}
    for factor in (1.2, 0.0):
        model = build_tiny_model(seed=44, num_experts=4, num_experts_per_tok=2, capacity_factor=factor)
        model.set_train(True)
        losses[factor] = float(
            model(_ids(np.random.default_rng(45), (4, 64)), _ids(np.random.default_rng(45), (4, 64))).asnumpy()
        )
    assert losses[1.2] != pytest.approx(losses[0.0], abs=1e-6)
    assert losses[1.2] == pytest.approx(losses[0.0], rel=0.05)  # a few choices dropped, not a different model


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


# -- dynamic NTK as the official model computes it: per sequence length, prefill and every decoding step ------------
#
# Reference: Tele-AI/TeleChat2, model/115B/modeling_telechat.py (and llama_factory_training/modeling_telechat2.py),
# `RotaryEmbedding.forward` and `TelechatAttention.forward`: seq_len = new tokens + cached ones, floored at
# training_seqlen; alpha = max(2^ceil(log(seq_len / base_seqlen, 2) + 1) - 1, 1); base * alpha^(D / (D - 2));
# mscale = 0.1 ln(seq_len / training_seqlen) + 1 past it; cos and sin times mscale; the new tokens take rows
# offset.. of that table. Cached keys keep the rotation they got when computed.


def _official_rotary(seq_len: int, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The official RotaryEmbedding.forward(seq_len=seq_len) table in float64: cos, sin [max(seq_len, T_train), D]."""
    seq_len = max(seq_len, cfg.training_seqlen)
    context_value = math.log(seq_len / cfg.max_position_embedding, 2) + 1
    ntk_alpha = max(2 ** math.ceil(context_value) - 1, 1)
    scale = seq_len / cfg.training_seqlen
    mscale = 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0
    dim = cfg.head_dim
    base = 10000.0 * ntk_alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    emb = np.outer(np.arange(seq_len), inv_freq)
    emb = np.concatenate([emb, emb], axis=-1)
    return mscale * np.cos(emb), mscale * np.sin(emb)


def _numpy_logits(ids: list[int], w: dict[str, np.ndarray], cfg, rotated_at: list[int], rotary=None) -> np.ndarray:
    """TeleChat2 in numpy (all layers, float64) -> logits [T, V]; position p is rotated with the official table of a
    sequence rotated_at[p] tokens long (the length when its query and key were computed), or `rotary(length)`'s."""
    heads, kv_heads, dim = cfg.num_heads, cfg.n_kv_heads, cfg.head_dim
    rotary = rotary or (lambda n: _official_rotary(n, cfg))
    tables = {n: rotary(n) for n in set(rotated_at)}

    def rms(x, weight):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * weight

    def rotate(x):  # x [T, heads, D]
        cos = np.stack([tables[n][0][p] for p, n in enumerate(rotated_at)])[:, None]
        sin = np.stack([tables[n][1][p] for p, n in enumerate(rotated_at)])[:, None]
        return x * cos + np.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], axis=-1) * sin

    x = w["model.tok_embeddings.embedding_weight"][ids].astype(np.float64)
    length = len(ids)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "attention_norm.weight"])
        q = rotate((h @ w[p + "attention.wq.weight"].T).reshape(length, heads, dim))
        kv = (h @ w[p + "attention.wk_v.weight"].T).reshape(length, kv_heads, 2 * dim)
        k, v = rotate(kv[..., :dim]), kv[..., dim:]
        context = np.zeros((length, heads, dim))
        for head in range(heads):
            group = head // (heads // kv_heads)
            scores = q[:, head] @ k[:, group].T / math.sqrt(dim)
            scores[np.triu_indices(length, 1)] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            context[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, group]
        x = x + context.reshape(length, -1) @ w[p + "attention.wo.weight"].T + w[p + "attention.wo.bias"]
        h = rms(x, w[p + "ffn_norm.weight"])
        gate, up = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "feed_forward.w2.weight"].T + w[p + "feed_forward.w2.bias"]
    return rms(x, w["model.norm_out.weight"]) @ w["lm_head.weight"].T


def _model(seed: int, **overrides):
    model = TeleChat2ForCausalLM(tiny_config(**overrides))
    weights = random_weights(model, seed)
    model.set_train(False)
    return model, weights


def _cached_decode(model, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy: prefill (PyNative), then `steps` compiled static-cache steps -> (tokens, logits [steps + 1, V])."""
    decoder = model.static_decoder()
    logits, cache = model.forward(ms.Tensor([prompt], ms.int32), last_only=True)
    keys, values = decoder.empty_cache(cache)
    rows = [logits.asnumpy()[0, -1]]
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(rows[-1])))
        logits, keys, values = decoder.step(ids[-1], len(ids) - 1, keys, values)
        rows.append(logits.asnumpy()[0, -1])
    return ids[len(prompt) :], np.stack(rows)


def test_ntk_alpha_and_mscale_follow_the_current_length_floored_at_the_trained_one():
    cfg = tiny_config(training_seqlen=16, max_position_embedding=16, seq_length=64)
    for length in (1, 16, 17, 24, 32, 33, 64):
        base, mscale = dynamic_ntk_base_and_mscale(length, cfg)
        cos, sin = rotary_cos_sin(length, 16, base, mscale)
        official_cos, official_sin = _official_rotary(length, cfg)
        np.testing.assert_allclose(cos, official_cos[:length], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(sin, official_sin[:length], rtol=1e-6, atol=1e-7)
    assert dynamic_ntk_base_and_mscale(16, cfg) == (10000.0, 1.0)
    assert dynamic_ntk_base_and_mscale(24, cfg) == pytest.approx((10000 * 3 ** (16 / 14), 1 + 0.1 * math.log(1.5)))
    assert dynamic_ntk_base_and_mscale(33, cfg)[0] == pytest.approx(10000 * 7 ** (16 / 14))  # log2(33/16)+1 > 2
    # base_seqlen below the trained length: alpha > 1 even for short sequences, as the official code computes
    assert dynamic_ntk_base_and_mscale(4, tiny_config(training_seqlen=32, max_position_embedding=16))[0] == (
        pytest.approx(10000 * 3 ** (16 / 14))
    )


@pytest.mark.parametrize("extend_method", ["None", "DYNAMIC_NTK"])
def test_a_long_seq_length_deployment_gives_short_prompts_the_trained_logits(extend_method):
    """seq_length 32768 (training_seqlen 8192) must not change what an 8192 deployment computes on a short prompt."""
    trained = {"training_seqlen": 8192, "max_position_embedding": 8192}
    short, weights = _model(31, seq_length=8192, **trained)
    long = TeleChat2ForCausalLM(tiny_config(seq_length=32768, extend_method=extend_method, **trained))
    for name, param in long.parameters_and_names():
        param.set_data(ms.Tensor(weights[name]))
    long.set_train(False)
    prompt = [1, 4, 57, 91, 230, 18, 77, 5]
    expected = short.forward(ms.Tensor([prompt], ms.int32))[0].asnumpy()[0]
    np.testing.assert_allclose(long.forward(ms.Tensor([prompt], ms.int32))[0].asnumpy()[0], expected, atol=1e-5)
    np.testing.assert_allclose(expected, _numpy_logits(prompt, weights, short.architecture, [8192] * 8), atol=1e-4)
    short_tokens, short_logits = _cached_decode(short, prompt, 4)
    long_tokens, long_logits = _cached_decode(long, prompt, 4)
    assert long_tokens == short_tokens
    np.testing.assert_allclose(long_logits, short_logits, atol=1e-5)


NTK = {"training_seqlen": 16, "max_position_embedding": 16, "seq_length": 64}  # no extend_method set


def test_a_prompt_past_the_trained_length_engages_the_official_ntk_in_prefill():
    model, weights = _model(32, **NTK)
    prompt = np.random.default_rng(33).integers(4, 512, 24).tolist()
    mine = model.forward(ms.Tensor([prompt], ms.int32))[0].asnumpy()[0]
    official = _numpy_logits(prompt, weights, model.architecture, [24] * 24)  # alpha 3, mscale 1 + 0.1 ln 1.5
    np.testing.assert_allclose(mine, official, rtol=1e-4, atol=1e-4)
    plain = _numpy_logits(prompt, weights, model.architecture, [24] * 24, lambda n: rotary_cos_sin(n, 16, 10000.0))
    assert np.abs(plain - official).max() > 1e-2


def test_kv_cache_decoding_recomputes_alpha_and_mscale_at_every_step_like_the_official_model():
    """Prompt of 30 tokens (alpha 3), decoding to 36: alpha becomes 7 at length 33 and mscale grows each step; the
    compiled step and the PyNative growing cache both give the official cached logits, and greedy decoding with the
    cache picks the tokens decoding without it (whole sequence rerun at its current length) picks."""
    from telechat2.generation import GenerationConfig, generate

    model, weights = _model(34, **NTK)
    prompt = np.random.default_rng(35).integers(4, 512, 30).tolist()
    tokens, logits = _cached_decode(model, prompt, 6)
    ids = prompt + tokens
    rotated_at = [30] * 30 + [p + 1 for p in range(30, len(ids))]  # prefill at 30, then each step at its length
    official = _numpy_logits(ids, weights, model.architecture, rotated_at)[29:]
    np.testing.assert_allclose(logits, official, rtol=1e-4, atol=1e-4)
    _, cache = model.forward(ms.Tensor([prompt], ms.int32))
    for position in range(30, len(ids) - 1):
        step, cache = model.forward(ms.Tensor([[ids[position]]], ms.int32), cache, position)
        np.testing.assert_allclose(step.asnumpy()[0, -1], logits[position - 29], rtol=1e-4, atol=1e-4)
    at_prompt = dynamic_ntk_base_and_mscale(30, model.architecture)  # alpha and mscale frozen at the prompt's
    frozen = _numpy_logits(ids, weights, model.architecture, rotated_at, lambda n: rotary_cos_sin(n, 16, *at_prompt))[
        29:
    ]
    assert np.abs(frozen - official).max() > 1e-3
    config = GenerationConfig(max_new_tokens=6, repetition_penalty=1.0, stop_token_ids=())
    cached = generate(model, prompt, config)
    config.use_cache = False
    assert cached == tokens == generate(model, prompt, config)


def test_graph_mode_forward_past_the_trained_length_uses_the_same_rotary():
    """In graph mode the lengths are static: the per-length table is a compile-time constant, same loss."""
    model = build_tiny_model(seed=12, training_seqlen=8, max_position_embedding=8, seq_length=32)
    ids = _ids(np.random.default_rng(13), (2, 17))  # 16 tokens: past training_seqlen, short of seq_length
    pynative_loss = float(model(ids, ids).asnumpy())
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_loss = float(model(ids, ids).asnumpy())
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert graph_loss == pytest.approx(pynative_loss, rel=1e-5)
    plain = build_tiny_model(seed=12, training_seqlen=32, max_position_embedding=32, seq_length=32)
    assert abs(float(plain(ids, ids).asnumpy()) - pynative_loss) > 1e-4  # NTK engaged at 16 tokens
