"""Correctness against code we did not write.

1. With biases zero, TeleChat2 is LLaMA with a fused, per-head interleaved key_value: MindFormers'
   LlamaForCausalLM (CPU settings: use_rope_slice, no flash attention, no fused RMSNorm; fp32) given the same
   weights must produce the same logits.
2. A single layer written out in numpy, with non-zero biases, checks the interleaving and where the biases go.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from tiny_model import build_tiny_model, random_weights, tiny_config

from telechat2.modeling import TeleChat2ForCausalLM


@pytest.fixture(autouse=True)
def _pynative_mode():
    """Eager execution, whatever mode an earlier test left behind (generation refuses graph mode)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


SEQ = 16  # MindFormers' LLaMA (no KV cache) needs inputs of exactly seq_length tokens


def _split_key_value(wk_v: np.ndarray, kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """[K_h0, V_h0, K_h1, V_h1, ...] rows -> (all K rows, all V rows): the facts file's rule."""
    per_head = wk_v.reshape(kv_heads, 2 * head_dim, -1)
    hidden = wk_v.shape[-1]
    return per_head[:, :head_dim].reshape(-1, hidden), per_head[:, head_dim:].reshape(-1, hidden)


@pytest.mark.slow
def test_logits_match_mindformers_llama_with_zero_biases():
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM

    ours = build_tiny_model(seed=21, seq_length=SEQ)
    weights = {name: p.asnumpy() for name, p in ours.parameters_and_names()}
    for name, param in ours.parameters_and_names():
        if name.endswith(".bias"):
            param.set_data(ms.Tensor(np.zeros(param.shape, np.float32)))

    llama = LlamaForCausalLM(
        LlamaConfig(
            batch_size=1, seq_length=SEQ, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
            intermediate_size=128, vocab_size=512, rms_norm_eps=1e-5, theta=10000.0, pad_token_id=3,
            compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
            rotary_dtype="float32", param_init_type="float32",
            use_rope_slice=True, use_flash_attention=False, fused_rms_norm=False, use_past=False,
        )
    )  # fmt: skip
    llama.set_train(False)
    mapped = {}
    for name, value in weights.items():
        if name.endswith("wk_v.weight"):
            keys, values = _split_key_value(value, kv_heads=2, head_dim=16)
            mapped[name.replace("wk_v", "wk")] = keys
            mapped[name.replace("wk_v", "wv")] = values
        elif not name.endswith(".bias"):
            mapped[name] = value
    llama_names = {name for name, _ in llama.parameters_and_names()}
    assert llama_names == set(mapped)  # every LLaMA weight comes from ours, by name
    for name, param in llama.parameters_and_names():
        param.set_data(ms.Tensor(mapped[name]))

    ids = ms.Tensor(np.random.default_rng(22).integers(4, 512, (1, SEQ)), ms.int32)
    theirs = llama(ids)[0].asnumpy()
    mine = ours(ids).asnumpy()
    assert theirs.shape == mine.shape == (1, SEQ, 512)
    assert np.abs(mine).max() > 0.1  # not a trivially small output
    np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)


# -- one layer by hand -------------------------------------------------------------------------------------------------


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, base: float) -> np.ndarray:
    """x [heads, S, D]; position p, pair (j, j + D/2) rotated by p / base^(2j / D)."""
    _, length, dim = x.shape
    out = np.empty_like(x)
    for p in range(length):
        for j in range(dim // 2):
            theta = p / base ** (2 * j / dim)
            a, b = x[:, p, j], x[:, p, j + dim // 2]
            out[:, p, j] = a * np.cos(theta) - b * np.sin(theta)
            out[:, p, j + dim // 2] = b * np.cos(theta) + a * np.sin(theta)
    return out


def _reference_logits(ids: np.ndarray, w: dict[str, np.ndarray], heads: int, kv_heads: int, eps: float) -> np.ndarray:
    """TeleChat2 for one sequence and one layer, written from the facts file with loops where it helps reading."""
    x = w["model.tok_embeddings.embedding_weight"][ids].astype(np.float64)  # [S, H]
    length, hidden = x.shape
    dim = hidden // heads
    layer = "model.layers.0."
    h = _rms(x, w[layer + "attention_norm.weight"], eps)
    q = (h @ w[layer + "attention.wq.weight"].T).reshape(length, heads, dim).transpose(1, 0, 2)
    kv = h @ w[layer + "attention.wk_v.weight"].T  # [S, 2 * kv_heads * D], per KV head: its K rows then its V rows
    k = np.stack([kv[:, g * 2 * dim : g * 2 * dim + dim] for g in range(kv_heads)])  # [kv_heads, S, D]
    v = np.stack([kv[:, g * 2 * dim + dim : (g + 1) * 2 * dim] for g in range(kv_heads)])
    q, k = _rope(q, 10000.0), _rope(k, 10000.0)
    context = np.zeros((length, hidden))
    for head in range(heads):
        group = head // (heads // kv_heads)  # query heads 0..n_rep-1 share KV head 0, ...
        scores = q[head] @ k[group].T / np.sqrt(dim)
        scores[np.triu_indices(length, 1)] = -np.inf
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context[:, head * dim : (head + 1) * dim] = probs @ v[group]
    x = x + context @ w[layer + "attention.wo.weight"].T + w[layer + "attention.wo.bias"]
    h = _rms(x, w[layer + "ffn_norm.weight"], eps)
    gate, up = h @ w[layer + "feed_forward.w1.weight"].T, h @ w[layer + "feed_forward.w3.weight"].T
    swiglu = gate / (1 + np.exp(-gate)) * up
    x = x + swiglu @ w[layer + "feed_forward.w2.weight"].T + w[layer + "feed_forward.w2.bias"]
    return _rms(x, w["model.norm_out.weight"], eps) @ w["lm_head.weight"].T


def test_single_layer_matches_a_hand_written_numpy_reference_with_biases():
    cfg = tiny_config(
        vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, n_kv_heads=1, intermediate_size=12,
        seq_length=8, rms_norm_eps=1e-6,
    )  # fmt: skip
    model = TeleChat2ForCausalLM(cfg)
    weights = random_weights(model, seed=23, std=0.5, bias_std=0.5)
    ids = np.array([1, 4, 9, 11, 2, 7])
    mine = model(ms.Tensor(ids[None], ms.int32)).asnumpy()[0]
    expected = _reference_logits(ids, weights, heads=2, kv_heads=1, eps=1e-6)
    np.testing.assert_allclose(mine, expected, rtol=1e-4, atol=1e-5)

    # The biases matter, and a K/V layout with the halves swapped gives a different model.
    no_bias = dict(weights, **{k: np.zeros_like(v) for k, v in weights.items() if k.endswith(".bias")})
    assert np.abs(_reference_logits(ids, no_bias, 2, 1, 1e-6) - expected).max() > 1e-2
    swapped = dict(weights)
    wk_v = weights["model.layers.0.attention.wk_v.weight"]
    swapped["model.layers.0.attention.wk_v.weight"] = np.concatenate([wk_v[4:], wk_v[:4]])
    assert np.abs(_reference_logits(ids, swapped, 2, 1, 1e-6) - expected).max() > 1e-2


def test_two_kv_heads_interleave_per_head_not_k_block_then_v_block():
    """With 2 KV heads, rows [K_h0, V_h0, K_h1, V_h1]: reading them as [K_h0, K_h1, V_h0, V_h1] must differ."""
    cfg = tiny_config(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, n_kv_heads=2, intermediate_size=12,
                      seq_length=8)  # fmt: skip
    model = TeleChat2ForCausalLM(cfg)
    weights = random_weights(model, seed=24, std=0.5, bias_std=0.5)
    ids = np.array([3, 5, 8, 13, 1])
    mine = model(ms.Tensor(ids[None], ms.int32)).asnumpy()[0]
    np.testing.assert_allclose(mine, _reference_logits(ids, weights, 2, 2, 1e-5), rtol=1e-4, atol=1e-5)
    wk_v = weights["model.layers.0.attention.wk_v.weight"]  # 4 blocks of head_dim 4 rows
    blocked = dict(weights)
    blocked["model.layers.0.attention.wk_v.weight"] = wk_v[[*range(0, 4), *range(8, 12), *range(4, 8), *range(12, 16)]]
    assert np.abs(_reference_logits(ids, blocked, 2, 2, 1e-5) - mine).max() > 1e-2
