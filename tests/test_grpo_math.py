"""Golden tests for the algorithm: advantages and the loss against values worked out by hand,
and per-token log-probs against the textbook computation."""

import math

import pytest
import torch

import grpo
from grpo import group_advantages, grpo_loss
from nanor1 import logprobs, sampling

# ------------------------------------------------------------------------- advantages

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0,  0.0, 0.0, 0.0, 0.0,  1.0, 2.0, 3.0, 4.0])
    adv = group_advantages(r, 4, "std")
    s0 = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]: deviations +-0.5, sum sq 1, / 3
    s2 = math.sqrt(5 / 3)  # unbiased std of [1, 2, 3, 4]: deviations 1.5, 0.5, sum sq 5, / 3
    want = [0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4),
            0, 0, 0, 0,
            -1.5 / (s2 + 1e-4), -0.5 / (s2 + 1e-4), 0.5 / (s2 + 1e-4), 1.5 / (s2 + 1e-4)]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)


def test_group_advantages_dr_grpo_is_mean_centred_only():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 4.0])
    adv = group_advantages(r, 4, "none")
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, -1.5, -0.5, 0.5, 1.5]))


def test_group_advantages_zero_mean_per_group_and_no_nan():
    torch.manual_seed(0)
    r = torch.rand(6 * 5)
    r[10:15] = 0.7  # one group whose rewards are all equal
    for scale in ["std", "none"]:
        adv = group_advantages(r, 5, scale)
        assert torch.isfinite(adv).all()
        assert torch.allclose(adv.view(6, 5).mean(1), torch.zeros(6), atol=1e-6)
        assert torch.equal(adv[10:15], torch.zeros(5))


def test_group_advantages_order_is_prompt_major():
    # the same rewards arranged so that only prompt-major grouping gives zero advantages
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.equal(group_advantages(r, 2, "std"), torch.zeros(4))
    assert not torch.equal(group_advantages(r, 4, "std"), torch.zeros(4))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), 4)


# ------------------------------------------------------------------------- the loss, by hand

def two_sequences():
    """Two completions, lengths 3 and 2, advantages +1 and -2; mu = 1 so old = logp."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])
    return logp, mask, adv


@pytest.mark.parametrize("agg, want_loss, want_grad", [
    # per-token loss is -ratio * A = -1 (seq 0) and +2 (seq 1); gradient wrt logp is -A * weight
    ("seq-mean", (-3 / 3 + 4 / 2) / 2, [[-1 / 6] * 3, [2 / 4, 2 / 4, 0.0]]),
    ("token-mean", (-3 + 4) / 5, [[-1 / 5] * 3, [2 / 5, 2 / 5, 0.0]]),
    ("seq-sum", (-3 / 4 + 4 / 4) / 2, [[-1 / 8] * 3, [2 / 8, 2 / 8, 0.0]]),  # max_len 4
])
def test_loss_and_gradient_by_hand(agg, want_loss, want_grad):
    logp, mask, adv = two_sequences()
    loss, m = grpo_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.2, 0.0, "k3", agg, max_len=4)
    loss.backward()
    assert loss.item() == pytest.approx(want_loss, abs=1e-6)
    assert torch.allclose(logp.grad, torch.tensor(want_grad), atol=1e-6)
    assert m["ratio"].item() == pytest.approx(1.0) and m["clip"].item() == 0.0


@pytest.mark.parametrize("kl, value, grad", [
    # logp = log 0.5, ref = log 0.25, d = ref - logp = -log 2
    ("k1", math.log(2), 1.0),                               # logp - ref
    ("k2", 0.5 * math.log(2) ** 2, math.log(2)),            # 0.5 d^2, d/dlogp = -d
    ("k3", 0.5 + math.log(2) - 1, 1 - 0.5),                 # e^d - d - 1, d/dlogp = 1 - e^d
])
def test_kl_estimators_against_formulas(kl, value, grad):
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    beta = 0.1
    loss, m = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 1), beta=beta, kl=kl)
    loss.backward()
    assert m["kl"].item() == pytest.approx(value, rel=1e-5)
    assert loss.item() == pytest.approx(beta * value, rel=1e-5)  # advantage 0: the loss is the KL term
    assert logp.grad.item() == pytest.approx(beta * grad, rel=1e-5)


def test_k3_is_non_negative_and_zero_when_models_agree():
    torch.manual_seed(0)
    logp = torch.randn(4, 7).log_softmax(-1)
    ref = torch.randn(4, 7).log_softmax(-1)
    mask = torch.ones(4, 7)
    _, m = grpo_loss(logp, logp, ref, torch.zeros(4), mask, beta=1.0, kl="k3")
    d = ref - logp
    assert m["kl"].item() == pytest.approx((torch.exp(d) - d - 1).mean().item(), rel=1e-6)
    for i in range(4):  # per token, through the code: every single-token KL is >= 0
        for t in range(7):
            one = torch.zeros(4, 7)
            one[i, t] = 1
            assert grpo_loss(logp, logp, ref, torch.zeros(4), one, beta=1.0, kl="k3")[1]["kl"].item() >= 0
    _, same = grpo_loss(logp, logp, logp.clone(), torch.zeros(4), mask, beta=1.0, kl="k3")
    assert same["kl"].item() == 0.0


def test_mu1_beta0_gradient_is_reinforce_with_group_baseline():
    """With ratio = 1 the GRPO gradient is -(1/B) sum_i A_i (1/|o_i|) sum_t grad log pi(o_it)."""
    torch.manual_seed(0)
    B, T, V, G = 6, 5, 11, 3
    theta = torch.randn(B, T, V, requires_grad=True)  # a policy with its own logits per position
    tokens = torch.randint(V, (B, T))
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, G, "std")

    logp = theta.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, agg="seq-mean")
    g_grpo, = torch.autograd.grad(loss, theta)

    # the textbook estimator, written independently: baseline = group mean, scaled by group std
    r = rewards.view(-1, G)
    a = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    logp2 = theta.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    surrogate = sum(a[i] * (logp2[i] * mask[i]).sum() / mask[i].sum() for i in range(B)) / B
    g_ref, = torch.autograd.grad(-surrogate, theta)
    assert torch.allclose(g_grpo, g_ref, atol=1e-6)
    assert g_grpo.abs().sum() > 0  # the loss is ~0, its gradient is not


def test_clipping_zeroes_gradient_exactly_where_ppo_says():
    # ratios 1.5, 1.25, 1.1, 0.9, 0.75, 0.5 against clip range [1 - 0.2, 1 + 0.28]
    ratios = torch.tensor([1.5, 1.25, 1.1, 0.9, 0.75, 0.5])
    old = torch.zeros(1, 6)
    mask = torch.ones(1, 6)
    for a, want_zero in [
        (1.0, [True, False, False, False, False, False]),   # A > 0: clipped above 1 + clip_high only
        (-1.0, [False, False, False, False, True, True]),  # A < 0: clipped below 1 - clip_low only
    ]:
        logp = ratios.log()[None].clone().requires_grad_(True)
        loss, m = grpo_loss(logp, old, None, torch.tensor([a]), mask, clip_low=0.2, clip_high=0.28, beta=0.0,
                            agg="token-mean")
        loss.backward()
        g = logp.grad[0]
        for k in range(6):
            if want_zero[k]:
                assert g[k] == 0, (a, k)
            else:  # unclipped: d(-ratio * A / 6)/dlogp = -ratio * A / 6
                assert g[k].item() == pytest.approx(-ratios[k].item() * a / 6, rel=1e-5), (a, k)
        assert m["clip"].item() == pytest.approx(sum(want_zero) / 6)


def test_masked_tokens_get_no_gradient():
    logp = torch.tensor([[-1.0, -50.0, -3.0], [-2.0, -1.0, -80.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, 0.0, -3.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    for agg in ["seq-mean", "token-mean", "seq-sum"]:
        logp.grad = None
        loss, _ = grpo_loss(logp, logp.detach() + 0.1, ref, torch.tensor([1.0, -1.0]), mask, beta=0.5,
                            agg=agg, max_len=3)
        loss.backward()
        assert torch.isfinite(loss)
        assert logp.grad[0, 1] == 0 and logp.grad[1, 2] == 0
        assert (logp.grad[mask.bool()] != 0).all()


def test_fully_masked_completion_does_not_count_in_seq_mean():
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0]])  # second completion dropped (e.g. truncated)
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, 5.0]), mask, beta=0.0)
    assert loss.item() == pytest.approx(-1.0)  # the mean over the one completion that remains


def test_clipped_ratio_and_kl_together_by_hand():
    # one completion of 2 tokens, A = +1, clip 0.2, beta 0.1, k3, seq-mean
    # ratio = 0.5/0.4 = 1.25 (clipped to 1.2) and 1.0; d = ref - logp = 0 and log(0.5/0.4)
    logp = torch.tensor([[math.log(0.5), math.log(0.4)]], requires_grad=True)
    old = torch.tensor([[math.log(0.4), math.log(0.4)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.5)]])
    k3 = 1.25 - math.log(1.25) - 1  # e^d - d - 1 with e^d = 1.25
    loss, m = grpo_loss(logp, old, ref, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.2, 0.1, "k3", "seq-mean")
    loss.backward()
    assert loss.item() == pytest.approx(((-1.2 + 0.0) + (-1.0 + 0.1 * k3)) / 2, rel=1e-6)
    # token 0: clipped, so only the KL term (0 at d = 0); token 1: -ratio*A + beta*(1 - e^d)
    assert logp.grad[0, 0].item() == pytest.approx(0.0, abs=1e-7)
    assert logp.grad[0, 1].item() == pytest.approx((-1.0 + 0.1 * (1 - 1.25)) / 2, rel=1e-6)
    assert m["clip"].item() == 0.5 and m["ratio"].item() == pytest.approx(1.125)
    assert m["kl"].item() == pytest.approx(k3 / 2, rel=1e-5)


# ------------------------------------------------------------------------- log-probs

def tokens(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def test_chunked_logprobs_and_their_gradients_equal_the_textbook_ones(tiny, monkeypatch):
    """One sequence a chunk (as a large vocabulary makes it), recomputed in the backward pass:
    the values and the weights' gradients of plain log_softmax over the whole batch."""
    model, tok = tiny
    prompts = tokens(tok, ["12 + 34 =", "the answer is 7", "1"])
    completions = [[40, 41, 42, 43], [50, 51], [60, 61, 62]]
    p_ids, p_mask, ids, mask = sampling.pad_batch(prompts, completions, tok.pad_token_id, "cpu")
    weights = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.7, 1.1, 0, 0], [-1.0, 2.0, 0.3, 0]])

    def grads(logp):
        model.zero_grad()
        (logp * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(logprobs, "LOGIT_CHUNK", 1)
    got = grpo.completion_logprobs(model, p_ids, p_mask, ids, mask, temperature=0.7)
    got_grads = grads(got)
    x = torch.cat([p_ids, ids], 1)
    attn = torch.cat([p_mask, mask], 1)
    logits = model(input_ids=x, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    lp = (logits[:, p_ids.shape[1] - 1:-1] / 0.7).log_softmax(-1)
    want = lp.gather(-1, ids[..., None]).squeeze(-1) * mask
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(got_grads, grads(want)):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(g.abs().max() > 1e-3 for g in got_grads)

def test_completion_logprobs_equal_full_sequence_forward(sharp):
    model, tok = sharp
    prompts = tokens(tok, ["12 + 34 =", "the answer is 7 so we get 12 + 5"])
    out = sampling.sample(model, prompts, 3, 9, [tok.eos_token_id], tok.pad_token_id, 1.0, 1.0,
                          torch.Generator().manual_seed(0))
    lengths = out["mask"].sum(1).tolist()
    completions = [out["ids"][i, :lengths[i]].tolist() for i in range(6)]
    p_ids, p_mask, ids, mask = sampling.pad_batch([prompts[i // 3] for i in range(6)], completions,
                                                tok.pad_token_id, "cpu")
    for temperature in [1.0, 0.7]:
        with torch.no_grad():
            logp, ent = grpo.completion_logprobs(model, p_ids, p_mask, ids, mask, temperature, with_entropy=True)
        for i in range(6):  # reference: each sequence alone, no padding, the plain textbook way
            seq = torch.tensor([prompts[i // 3] + completions[i]])
            with torch.no_grad():
                logits = model(seq).logits[0, len(prompts[i // 3]) - 1:-1] / temperature
            lp = logits.log_softmax(-1)
            want = lp.gather(-1, torch.tensor(completions[i])[:, None]).squeeze(-1)
            want_ent = -(lp.exp() * lp).sum(-1)
            n = len(completions[i])
            assert torch.allclose(logp[i, :n], want, atol=1e-5)
            assert torch.allclose(ent[i, :n], want_ent, atol=1e-4)
            assert (logp[i, n:] == 0).all()
