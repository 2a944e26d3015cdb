"""Cache access and KV features on tiny Llama / Qwen2 / Qwen3 models."""

import pytest
import torch
from transformers import DynamicCache

from kvprobe.features import FeatureSpec, OutputStats, pooled_response, prompt_window, response_index, token_trajectory
from kvprobe.cache import UnreadableCache, layer_kv, newest_kv
from kvprobe.capture import GenerationSpec, answer_features, generate_batch
from kvprobe.models import ModelSpec, load_model
from kvprobe.prompts import PromptSpec, prompt_ids
from kvprobe.tasks import Item


@pytest.fixture
def lm(tiny):
    return load_model(ModelSpec(name=str(tiny)))


def _prompts(lm, n=3):
    items = [Item(f"q{i}", "What is " + " + ".join(["3"] * (i + 1)) + "?", "3") for i in range(n)]
    return [prompt_ids(it, PromptSpec(mode="slow"), lm.tokenizer) for it in items]


def test_layer_kv_shapes_and_formats(lm):
    ids = torch.tensor([_prompts(lm, 1)[0]])
    out = lm.model(input_ids=ids, use_cache=True)
    pairs = layer_kv(out)
    s = lm.shape
    assert len(pairs) == s.layers
    assert pairs[0][0].shape == (1, s.kv_heads, ids.shape[1], s.head_dim)
    assert s.kv_heads < lm.model.config.num_attention_heads  # the tiny configs use GQA
    legacy = tuple((k, v) for k, v in pairs)  # pre-4.4x tuples
    assert all(torch.equal(a[0], b[0]) for a, b in zip(layer_kv(legacy), pairs))

    class OldCache:  # transformers 4.4x-4.55 layout
        key_cache = [k for k, _ in pairs]
        value_cache = [v for _, v in pairs]

    assert all(torch.equal(a[1], b[1]) for a, b in zip(layer_kv(OldCache()), pairs))


def test_refuses_what_it_cannot_read(lm):
    ids = torch.tensor([_prompts(lm, 1)[0]])
    cache = lm.model(input_ids=ids, use_cache=True).cache
    cache.offloading = True
    with pytest.raises(UnreadableCache, match="offloaded"):
        layer_kv(cache)
    cache.offloading = False
    layer = cache.layers[0]
    layer.cumulative_length = layer.keys.shape[-2] + 5  # what a sliding window that dropped 5 tokens reports
    with pytest.raises(UnreadableCache, match="sliding window"):
        layer_kv(cache)
    with pytest.raises(UnreadableCache, match="no keys"):
        layer_kv(DynamicCache(config=lm.model.config))
    with pytest.raises(UnreadableCache):
        layer_kv(object())


def test_newest_kv_is_the_last_column_of_every_layer(lm):
    prompts = _prompts(lm, 2)
    ids = torch.tensor([p[: min(map(len, prompts))] for p in prompts])
    cache = lm.model(input_ids=ids, use_cache=True).cache
    want = torch.stack([torch.stack((k[:, :, -1], v[:, :, -1]), 1) for k, v in layer_kv(cache)], 1)
    got = newest_kv(cache)
    assert got.shape == (2, lm.shape.layers, 2, lm.shape.kv_heads, lm.shape.head_dim) and torch.equal(got, want)
    assert torch.equal(newest_kv([(k, v) for k, v in layer_kv(cache)]), want)  # legacy tuples go through layer_kv
    assert torch.equal(newest_kv(cache, kv="k"), want[:, :, :1]) and torch.equal(newest_kv(cache, kv="v"), want[:, :, 1:])
    layer = cache.layers[0]
    layer.cumulative_length = layer.keys.shape[-2] + 5  # a dropped sliding-window prefix: the newest column is intact
    assert torch.equal(newest_kv(cache), want)
    with pytest.raises(UnreadableCache, match="no keys"):
        newest_kv(DynamicCache(config=lm.model.config))
    quantized = type("QuantizedLayer", (type(layer),), {})
    cache.layers[1].__class__ = quantized
    layer.cumulative_length = layer.keys.shape[-2]
    with pytest.raises(UnreadableCache, match="quantized"):
        newest_kv(cache)
    with pytest.raises(UnreadableCache, match="quantized"):
        layer_kv(cache)


def test_pooled_response_equals_fresh_forward(lm):
    """Pooling the generation's own cache gives what a second forward pass over prompt+answer gives."""
    ids = _prompts(lm, 1)
    out, new, lengths, _, _, width = generate_batch(lm, ids, GenerationSpec(), 12, FeatureSpec())
    pooled = pooled_response(layer_kv(out), width, lengths)
    n = int(lengths[0])
    full = torch.tensor([ids[0] + new[0, :n].tolist()])
    fresh = layer_kv(lm.model(input_ids=full, use_cache=True))
    positions = slice(width - 1, width - 1 + n)
    expect = torch.stack([torch.stack((k[0, :, positions].mean(1), v[0, :, positions].mean(1))) for k, v in fresh])
    torch.testing.assert_close(pooled[0], expect, rtol=1e-4, atol=1e-5)


def test_left_padding_does_not_change_features(lm):
    ids = _prompts(lm, 3)
    spec = FeatureSpec(prompt_window=4, hidden_states=True)
    alone = []
    for one in ids:
        out, new, lengths, _, _, width = generate_batch(lm, [one], GenerationSpec(), 10, spec)
        tensors, traj = answer_features(out, width, lengths, torch.tensor([len(one)]), lm, spec)
        alone.append((new[0, : lengths[0]], tensors, traj[0]))
    out, new, lengths, _, _, width = generate_batch(lm, ids, GenerationSpec(), 10, spec)
    assert len({len(x) for x in ids}) > 1  # the batch really is padded
    tensors, traj = answer_features(out, width, lengths, torch.tensor([len(x) for x in ids]), lm, spec)
    for b, (tokens, single, single_traj) in enumerate(alone):
        assert torch.equal(new[b, : lengths[b]], tokens)
        for name in single:
            torch.testing.assert_close(tensors[name][b], single[name][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(traj[b], single_traj, rtol=1e-4, atol=1e-4)


def test_response_index_and_window_by_hand():
    batch, pos = response_index(5, torch.tensor([2, 1, 3]))
    assert batch.tolist() == [0, 0, 1, 2, 2, 2]
    assert pos.tolist() == [4, 5, 4, 4, 5, 6]
    k = torch.arange(2 * 1 * 8 * 1, dtype=torch.float32).view(2, 1, 8, 1)  # (batch, heads, seq, dim)
    pairs = [(k, -k)]
    pooled = pooled_response(pairs, 5, torch.tensor([2, 3]))
    assert pooled[0, 0, 0, 0, 0].item() == (4 + 5) / 2  # positions 4, 5 of item 0
    assert pooled[1, 0, 1, 0, 0].item() == -(12 + 13 + 14) / 3  # V of positions 4..6 of item 1 (offset 8)
    window = prompt_window(pairs, 5, torch.tensor([5, 2]), 3, [0])
    assert window[0, 0, 0, 0, :, 0].tolist() == [2, 3, 4]
    assert window[1, 0, 0, 0, :, 0].tolist() == [0, 11, 12]  # prompt of 2 tokens: the third slot is zero-filled
    traj = token_trajectory([(k, -k), (3 * k, k)], 5, torch.tensor([1, 2]))
    assert traj[0][0, 0, 0, 0].item() == (4 + 12) / 2 and traj[1].shape == (2, 2, 1, 1)


def test_output_stats_masks_finished_items():
    stats = OutputStats()
    stats(None, torch.tensor([[0.0, 0.0], [10.0, -10.0]]))
    stats(None, torch.tensor([[10.0, -10.0], [0.0, 0.0]]))
    max_prob, entropy = stats.means(torch.tensor([2, 1]))
    assert max_prob[0].item() == pytest.approx((0.5 + 1.0) / 2, abs=1e-6)
    assert max_prob[1].item() == pytest.approx(1.0, abs=1e-6)  # its second step is padding: ignored
    assert entropy[0].item() == pytest.approx(torch.log(torch.tensor(2.0)).item() / 2, abs=1e-5)


def test_last_logits_only_equals_the_full_logits_last_column(lm):
    """The contiguous last-position request gives the same logits as computing every position, prefill and decode,
    left padding included, and the same greedy tokens as generate's defaults."""
    from kvprobe.models import last_logits_only

    prompts = _prompts(lm, 3)
    width = max(map(len, prompts))
    ids = torch.tensor([[lm.tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        full = lm.model(input_ids=ids, attention_mask=mask).logits[:, -1]
        last = lm.model(input_ids=ids, attention_mask=mask, **last_logits_only(lm.model)).logits
        assert last.shape[1] == 1
        torch.testing.assert_close(last[:, 0], full, atol=1e-5, rtol=1e-5)
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        assert torch.equal(lm.model.generate(**kwargs), lm.model.generate(**kwargs, **last_logits_only(lm.model)))
