"""The sampling engine: batched sampling equal to one prompt at a time, masks and truncation,
seeds and top-p, tokens drawn with their probabilities, finished rows leaving the batch,
the KV-cached loop equal to decoding without a cache, and no deprecation warning from transformers."""

import pytest
import torch

from nanor1 import sampling

# ------------------------------------------------------------------------- sampling

def encode(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def test_sampling_batched_equals_one_prompt_at_a_time(sharp):
    """Left padding, cache and positions are right: greedy completions do not depend on the batch."""
    model, tok = sharp
    prompts = encode(tok, ["12 + 34 =", "the answer is 7 so we get", "1"])  # different lengths
    out = sampling.sample(model, prompts, 2, 12, [tok.eos_token_id], tok.pad_token_id, temperature=0)
    assert out["ids"].shape[0] == 6
    for p in range(3):
        alone = sampling.sample(model, prompts[p:p + 1], 1, 12, [tok.eos_token_id], tok.pad_token_id, temperature=0)
        n = alone["ids"].shape[1]
        for g in range(2):  # prompt-major order: rows 2p, 2p + 1 belong to prompt p
            assert torch.equal(out["ids"][2 * p + g, :n], alone["ids"][0])


def test_sampling_mask_and_truncation_flags(sharp):
    """A hand-built case: declare as end token a token greedy decoding emits at a known place."""
    model, tok = sharp
    prompts = encode(tok, ["12 + 34 =", "the answer is"])
    free = sampling.sample(model, prompts, 1, 10, [tok.eos_token_id], tok.pad_token_id, temperature=0)["ids"]
    end = int(free[0, 3])  # prompt 0's 4th greedy token becomes the end token
    k0 = free[0].tolist().index(end)  # its first occurrence
    out = sampling.sample(model, prompts, 1, 10, [end], tok.pad_token_id, temperature=0)
    ids, mask, trunc = out["ids"], out["mask"], out["truncated"]
    assert mask[0].tolist() == [1] * (k0 + 1) + [0] * (ids.shape[1] - k0 - 1)  # end token included
    assert ids[0, :k0 + 1].tolist() == free[0, :k0 + 1].tolist()
    assert (ids[0, k0 + 1:] == tok.pad_token_id).all()
    assert not trunc[0]
    # the end token as the very last allowed token: ended, not truncated
    exact = sampling.sample(model, prompts[:1], 1, k0 + 1, [end], tok.pad_token_id, temperature=0)
    assert exact["mask"][0].tolist() == [1] * (k0 + 1) and not exact["truncated"][0]
    cut = sampling.sample(model, prompts[:1], 1, k0, [end], tok.pad_token_id, temperature=0)
    assert cut["mask"][0].tolist() == [1] * k0 and cut["truncated"][0]
    row1 = free[1].tolist()
    if end in row1:  # prompt 1 stops at its own first end token, else runs to the limit
        k1 = row1.index(end)
        assert mask[1].sum() == k1 + 1 and not trunc[1]
    else:
        assert mask[1].sum() == 10 and trunc[1] and ids.shape[1] == 10


def test_sampling_is_seeded_and_respects_top_p(tiny):
    model, tok = tiny
    prompts = encode(tok, ["12 + 34 ="])
    run = lambda seed, top_p: sampling.sample(model, prompts, 4, 8, [tok.eos_token_id], tok.pad_token_id, 1.0, top_p,
                                              torch.Generator().manual_seed(seed))["ids"]
    assert torch.equal(run(1, 1.0), run(1, 1.0))
    assert not torch.equal(run(1, 1.0), run(2, 1.0))
    # top-p so small that only the most likely token survives: sampling is greedy
    greedy = sampling.sample(model, prompts, 4, 8, [tok.eos_token_id], tok.pad_token_id, temperature=0)["ids"]
    assert torch.equal(run(3, 1e-6), greedy)


def test_sample_next_draws_each_token_with_its_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])  # the last one never
    logits = probs.clamp(min=1e-30).log()[None].expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sampling.sample_next(logits, 1.0, 1.0, g) for _ in range(5)])  # 20,000 draws
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    # binomial standard deviations are at most 0.0036: 0.015 is over 4 of them
    assert torch.allclose(freq, probs, atol=0.015) and freq[4] == 0
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.81, 0.96, 0.999999])  # the inverse CDF at hand-picked points
    assert sampling.sample_next(probs.log()[None].expand(7, -1), 1.0, 1.0, u=u).tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_finished_completions_leave_the_batch_without_changing_the_others(sharp, monkeypatch):
    """A row that ends stops costing forward passes, and the rows still sampling draw what
    they would have drawn had nothing ended (each row has its own random numbers)."""
    model, tok = sharp
    prompts = encode(tok, ["12 + 34 =", "the answer is 7 so we get"])
    run = lambda eos: sampling.sample(model, prompts, 4, 16, eos, tok.pad_token_id, 1.0, 1.0,  # noqa: E731
                                      torch.Generator().manual_seed(3))
    free = run([])
    counts = torch.bincount(free["ids"][:, :8].flatten())
    end = int(counts.argmax())  # a token sampled early in several rows becomes the end token
    sizes = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: sizes.append(kw["input_ids"].shape[0]) or real_forward(**kw))
    out = run([end])
    ended = ~out["truncated"]
    assert 0 < int(ended.sum()) < 8
    for i in range(8):  # each row equals the free run's up to its end token, then padding
        n = int(out["mask"][i].sum())
        assert out["ids"][i, :n].tolist() == free["ids"][i, :n].tolist()
        assert bool(ended[i]) == (end in free["ids"][i, :16].tolist())
    # the prompts' pass, then one pass a token with the rows that have not ended by then
    last = [int(out["mask"][i].sum()) - 1 if ended[i] else 16 for i in range(8)]  # each row's last token
    want = [sum(k > t for k in last) for t in range(len(sizes) - 1)]
    assert sizes == [2] + want and want[-1] < 8


@pytest.mark.parametrize("attention, window", [("sdpa", None), ("eager", None), ("sdpa", 5)])
def test_sampling_equals_decoding_without_a_cache(tiny, attention, window):
    """The sampler's cache, positions and masks (its own 4D mask for SDPA, Hugging Face's for
    eager attention and for sliding-window layers, whose caches keep only the window) give
    the tokens of plain greedy decoding: the whole sequence through the model at every step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base, tok = tiny
    fields = {k: v for k, v in base.config.to_dict().items() if k != "layer_types"}  # derived from the window
    config = Qwen2Config(**{**fields, "use_sliding_window": window is not None, "sliding_window": window or 4096,
                            "max_window_layers": 0})
    config._attn_implementation = attention
    assert ("sliding_attention" in config.layer_types) == (window is not None)
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # context-sensitive, as the `sharp` fixture
    prompts = encode(tok, ["12 + 34 =", "the answer is 7 so we get"])  # different lengths: left padding
    out = sampling.sample(model, prompts, 2, 10, [tok.eos_token_id], tok.pad_token_id, temperature=0)
    for p, prompt in enumerate(prompts):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
                if seq[-1] == tok.eos_token_id:
                    break
        want = seq[len(prompt):]
        for g in range(2):
            assert out["ids"][2 * p + g, :len(want)].tolist() == want


def test_sampling_passes_the_cache_under_its_current_name(sharp, caplog, monkeypatch):
    """No deprecation warning from transformers (the KV cache goes in and comes out under the name
    the installed version documents: `cache` from 5.24 on), and the tokens of decoding without a cache."""
    import logging
    import warnings

    model, tok = sharp
    prompts = encode(tok, ["12 + 34 =", "the answer is 7 so we get"])
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # its log lines reach caplog
    logging.Logger.warning_once.cache_clear()  # transformers says a warning once a process: say it again here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sampling.sample(model, prompts, 2, 8, [], tok.pad_token_id, temperature=0)
    said = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    said += caplog.messages  # transformers' own log lines ("[transformers] ... deprecated")
    assert not [s for s in said if "past_key_values" in s or "cache" in s], said
    for p, prompt in enumerate(prompts):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(8):  # the whole sequence through the model at every step
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert out["ids"][2 * p].tolist() == out["ids"][2 * p + 1].tolist() == seq[len(prompt):]


def test_sample_next_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probs ~ .64 .24 .09 .03
    g = torch.Generator().manual_seed(0)
    seen = {int(sampling.sample_next(logits, 1.0, 0.8, g)) for _ in range(300)}
    assert seen == {0, 1}  # .64 < .8 needs the second token; .88 >= .8 stops there


def test_low_precision_copy_holds_the_rounded_weights_and_follows_the_model(sharp):
    import copy

    model = copy.deepcopy(sharp[0])
    tok = sharp[1]
    low = sampling.low_precision_copy(model, torch.bfloat16)
    weights = dict(model.named_parameters())
    for name, p in low.named_parameters():
        assert p.dtype == torch.bfloat16 and not p.requires_grad
        assert torch.equal(p, weights[name].detach().to(torch.bfloat16))
    assert low.get_output_embeddings().weight is low.get_input_embeddings().weight  # still tied, as in the model
    for name, b in low.named_buffers():  # the rotary frequencies stay exact
        assert b.dtype == dict(model.named_buffers())[name].dtype
    with torch.no_grad():  # an update of the model reaches the copy on the next call, in place
        for p in model.parameters():
            p.add_(0.01)
    again = sampling.low_precision_copy(model, torch.bfloat16, low)
    assert again is low
    assert all(torch.equal(p, q.detach().to(torch.bfloat16)) for p, q in zip(low.parameters(), model.parameters()))
    # greedy decoding from the copy gives the float32 model's tokens (the weights are scaled up,
    # so the top token leads by far more than bf16's rounding)
    prompts = [tok("12 + 5 =")["input_ids"], tok("the answer")["input_ids"]]
    want = sampling.sample(model, prompts, 1, 6, [], tok.pad_token_id, temperature=0)["ids"]
    got = sampling.sample(low, prompts, 1, 6, [], tok.pad_token_id, temperature=0)["ids"]
    assert torch.equal(got, want), (got, want)
