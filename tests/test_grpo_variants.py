"""Every objective and advantage variant of grpo.py against its paper's formula, written out
again here one token at a time in float64 (values and gradients), plus the cases worked out
by hand: RLOO with two samples, the dual clip's cap, CISPO's gradient on a clipped token,
GSPO on one-token completions, the high-entropy tokens, truncated importance sampling."""

import math

import pytest
import torch

from grpo import group_advantages, grpo_loss

torch.set_default_dtype(torch.float32)  # the functions must keep float64 inputs in float64 themselves


def flat(rows):
    """A (B, T) tensor or nested list as one flat list, for pytest.approx."""
    rows = rows.tolist() if torch.is_tensor(rows) else rows
    return [x for row in rows for x in row]

# ------------------------------------------------------------------------- advantages


def test_rloo_with_two_samples_is_plus_minus_the_difference():
    adv = group_advantages(torch.tensor([3.0, 1.0, 0.5, 0.5], dtype=torch.float64), 2, "none", "loo")
    assert adv.tolist() == [2.0, -2.0, 0.0, 0.0]  # +-(r1 - r2) / (G - 1), G = 2; an equal group: 0


def test_rloo_is_each_reward_minus_the_mean_of_the_others():
    r = [1.0, 0.0, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0]
    adv = group_advantages(torch.tensor(r, dtype=torch.float64), 4, "none", "loo")
    want = []
    for g in range(2):
        group = r[4 * g:4 * g + 4]
        want += [x - (sum(group) - x) / 3 for x in group]
    assert adv.dtype == torch.float64
    assert adv.tolist() == pytest.approx(want, abs=1e-15)
    assert want[:4] == pytest.approx([1 - 0.5 / 3, -1.5 / 3, -1.5 / 3, 0.5 - 1 / 3])  # by hand
    # G / (G - 1) times the group-mean advantage
    assert torch.allclose(adv, group_advantages(torch.tensor(r, dtype=torch.float64), 4, "none") * 4 / 3)


def test_batch_centred_scale_divides_by_the_std_of_the_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # groups of 3
    adv = group_advantages(r, 3, "batch-centred")
    # r - mean: 2/3, -1/3, -1/3, -2/3, 1/3, 1/3 (mean 0); unbiased variance (4+1+1+4+1+1)/9 / 5 = 12/45
    want = [2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]
    assert adv.tolist() == pytest.approx([w / (math.sqrt(12 / 45) + 1e-4) for w in want], abs=1e-12)
    assert math.sqrt(12 / 45) < math.sqrt(0.3)  # smaller than the raw rewards' std: no spread between prompts


def test_batch_scale_divides_by_the_std_of_all_rewards():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # groups of 3
    adv = group_advantages(r, 3, "batch")
    # group means 1/3 and 2/3; the batch's rewards 1,0,0,0,1,1: mean 1/2, unbiased variance 6 * 1/4 / 5
    std = math.sqrt(0.3)
    want = [2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]
    assert adv.tolist() == pytest.approx([w / (std + 1e-4) for w in want], abs=1e-12)
    # unlike the group std, one group's scale depends on the others
    assert not torch.allclose(group_advantages(r[:3], 3, "batch"), adv[:3])


@pytest.mark.parametrize("scale", ["std", "none", "batch", "batch-centred"])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_all_equal_groups_get_zero_and_nothing_is_nan(scale, baseline):
    r = torch.tensor([0.7] * 4 + [1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    adv = group_advantages(r, 4, scale, baseline)
    assert torch.isfinite(adv).all() and adv[:4].tolist() == [0.0] * 4
    everything_equal = group_advantages(torch.ones(8), 4, scale, baseline)
    assert everything_equal.tolist() == [0.0] * 8


def test_unknown_baseline_or_scale_is_refused():
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(torch.zeros(4), 2, "std", "median")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, "max")


# ------------------------------------------------------------------------- the losses, one token at a time


def reference_loss(logp, old, ref, adv, mask, clip_low=0.2, clip_high=0.2, beta=0.0, agg="seq-mean", max_len=None,
                   ratio_level="token", objective="clip", clip_c=0.0, keep=None, taus=(1.0, 1.05), sampler=None,
                   tis=None, tis_level="sequence"):
    """The objectives as their papers write them, a scalar at a time (slow, plain, independent)."""
    B, T = mask.shape
    seq_losses, token_sum, n_tokens = [], 0.0, 0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        if not toks:
            continue
        A = float(adv[i])
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in toks) / len(toks))  # GSPO's s_i
        w_seq = min(math.exp(sum(float(old[i, t] - sampler[i, t]) for t in toks)), tis) if tis else 1.0
        terms = []
        for t in toks:
            r = s if ratio_level == "sequence" else torch.exp(logp[i, t] - old[i, t])
            r_clipped = torch.clamp(r, 1 - clip_low, 1 + clip_high)
            if objective == "clip":  # PPO: -min(r A, clip(r) A); dual clip: at most -C A when A < 0
                term = -torch.min(r * A, r_clipped * A)
                if clip_c and A < 0:
                    term = torch.clamp(term, max=-clip_c * A)
            elif objective == "cispo":  # -sg(clip(r)) A log pi
                term = -float(r_clipped.detach()) * A * logp[i, t]
            elif objective == "sapo":  # -(4 / tau) sigmoid(tau (r - 1)) A
                tau = taus[0] if A > 0 else taus[1]
                term = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * A
            else:  # plain policy gradient
                term = -A * logp[i, t]
            if tis and tis_level == "token":
                term = term * min(math.exp(float(old[i, t] - sampler[i, t])), tis)
            elif tis:
                term = term * w_seq
            if keep is not None and not keep[i][t]:
                term = term * 0.0
            if beta:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            terms.append(term)
        total = sum(terms)
        token_sum, n_tokens = token_sum + total, n_tokens + len(toks)
        seq_losses.append(total / (len(toks) if agg == "seq-mean" else max_len or 1))
    if agg == "token-mean":
        return token_sum / n_tokens
    return sum(seq_losses) / len(seq_losses)


def batch(seed=0):
    """Five completions of lengths 3, 5, 1, 0 (masked out) and 2 (advantage 0: its group's
    rewards were equal) in float64, with junk on the padding."""
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.1
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)  # ratios ~0.5-2
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    sampler = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    with torch.no_grad():  # padding: values a careless mask would let through
        for x in (old, logp, ref, sampler, entropy):
            x[mask == 0] = -4.0 if x is not entropy else 9.0
    adv = torch.tensor([1.3, -0.8, 2.0, 5.0, 0.0], dtype=torch.float64)
    return logp, old, ref, sampler, adv, mask, entropy


def kept_by_hand(entropy, mask, q):
    """The tokens at or above the valid entropies' (1 - q) quantile, found with numpy."""
    import numpy as np

    cut = np.quantile(entropy[mask.bool()].numpy(), 1 - q)  # numpy's default: linear interpolation
    return (entropy.numpy() >= cut) & mask.bool().numpy()


VARIANTS = [
    dict(),  # GRPO
    dict(beta=0.04),
    dict(clip_high=0.28, agg="token-mean"),  # DAPO's clip-higher
    dict(agg="seq-sum", max_len=5),  # Dr. GRPO's aggregation
    dict(ratio_level="sequence"),  # GSPO
    dict(ratio_level="sequence", clip_low=0.05, clip_high=0.1, beta=0.04),
    dict(objective="cispo", clip_low=1.0, clip_high=0.3, agg="token-mean"),  # CISPO
    dict(objective="cispo", clip_low=0.1, clip_high=0.1),
    dict(objective="sapo"),  # SAPO
    dict(objective="sapo", taus=(0.5, 2.0), beta=0.04),
    dict(objective="pg"),  # REINFORCE / GPG
    dict(objective="pg", agg="token-mean"),
    dict(clip_c=1.5),  # dual clip
    dict(clip_c=1.5, ratio_level="sequence", clip_low=0.05, clip_high=0.05),
    dict(tis=1.2, tis_level="token"),
    dict(tis=1.2, tis_level="sequence", objective="cispo", beta=0.04),
    dict(top_entropy=0.4),  # the high-entropy minority
    dict(top_entropy=0.5, objective="cispo", beta=0.04, agg="token-mean"),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "grpo")
def test_each_variant_equals_its_formula_in_value_and_gradient(kw):
    for seed in range(3):
        logp, old, ref, sampler, adv, mask, entropy = batch(seed)
        kw = dict(kw)
        taus = kw.pop("taus", (1.0, 1.05))
        q = kw.pop("top_entropy", 1.0)
        keep = kept_by_hand(entropy, mask, q) if q < 1 else None
        want = reference_loss(logp, old, ref, adv, mask, taus=taus, sampler=sampler, keep=keep, **kw)
        want_grad, = torch.autograd.grad(want, logp)
        beta = kw.pop("beta", 0.0)
        got, _ = grpo_loss(logp, old, ref if beta else None, adv, mask, beta=beta, sapo_tau_pos=taus[0],
                           sapo_tau_neg=taus[1], sampler_logp=sampler, top_entropy=q, entropy=entropy, **kw)
        got_grad, = torch.autograd.grad(got, logp)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-14)
        assert torch.allclose(got_grad, want_grad, rtol=1e-10, atol=1e-14)
        assert (got_grad[mask == 0] == 0).all()  # padding and the masked-out completion: no gradient


def test_gspo_on_one_token_completions_is_the_token_level_objective():
    logp, old, ref, _, adv, _, _ = batch(1)
    one = torch.zeros(5, 5, dtype=torch.long)
    one[:, 0] = 1
    for kw in [dict(), dict(clip_low=0.05, clip_high=0.05, beta=0.1)]:
        beta = kw.pop("beta", 0.0)
        values, grads = [], []
        for level in ["token", "sequence"]:
            loss, _ = grpo_loss(logp, old, ref, adv, one, beta=beta, ratio_level=level, **kw)
            values.append(loss)
            grads.append(torch.autograd.grad(loss, logp)[0])
        assert values[0].item() == values[1].item()
        assert torch.equal(grads[0], grads[1])


def test_gspo_keeps_or_clips_a_whole_completion():
    # one completion, A = +1, token ratios 2.0 and 0.5: token level clips the first token only;
    # GSPO's ratio is their geometric mean, 1, inside the range: no token is clipped
    logp = torch.tensor([[math.log(2.0), math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2)
    adv = torch.tensor([1.0], dtype=torch.float64)
    _, token = grpo_loss(logp, old, None, adv, mask, beta=0.0)
    loss, seq = grpo_loss(logp, old, None, adv, mask, beta=0.0, ratio_level="sequence")
    assert token["clip"].item() == 0.5 and seq["clip"].item() == 0.0
    assert seq["ratio"].item() == pytest.approx(1.0)
    g, = torch.autograd.grad(loss, logp)
    # d/dlogp_t of -s A with s = exp(mean_t log r_t): -s A / |o| = -1/2 each; seq-mean over one completion
    assert flat(g) == pytest.approx([-0.5, -0.5])


def test_cispo_clipped_token_still_gets_a_gradient_where_ppo_clip_gives_none():
    # ratio 1.5 > 1 + 0.2 with A = +1 (token 0), ratio 1.0 (token 1)
    logp = torch.tensor([[math.log(1.5), 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask, adv = torch.ones(1, 2), torch.tensor([1.0], dtype=torch.float64)
    clip, _ = grpo_loss(logp, old, None, adv, mask, 0.2, 0.2, beta=0.0, agg="token-mean")
    g_clip, = torch.autograd.grad(clip, logp)
    cispo, m = grpo_loss(logp, old, None, adv, mask, 0.2, 0.2, beta=0.0, agg="token-mean", objective="cispo")
    g_cispo, = torch.autograd.grad(cispo, logp)
    assert g_clip[0, 0].item() == 0.0
    assert g_cispo[0, 0].item() == pytest.approx(-1.2 / 2)  # -sg(clip(1.5)) A / 2 tokens
    assert g_cispo[0, 1].item() == pytest.approx(-1.0 / 2) == g_clip[0, 1].item()  # unclipped: the same
    assert m["clip"].item() == 0.5


def test_dual_clip_caps_the_loss_of_negative_advantages_by_hand():
    ratios = [0.5, 1.0, 2.0, 4.0]
    logp = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    old, mask = torch.zeros(1, 4, dtype=torch.float64), torch.ones(1, 4)
    per_token = []
    for a in [-1.0, 1.0]:
        loss, m = grpo_loss(logp, old, None, torch.tensor([a], dtype=torch.float64), mask, 0.2, 0.2, beta=0.0,
                            agg="token-mean", clip_c=3.0)
        g, = torch.autograd.grad(loss, logp)
        per_token.append((loss.item() * 4, (g * 4).tolist()[0], m))
    # A = -1: losses max(r, clip(r)) = 0.8, 1, 2, 4 -> capped at 3; gradients r where r counts
    assert per_token[0][0] == pytest.approx(0.8 + 1 + 2 + 3)
    assert per_token[0][1] == pytest.approx([0.0, 1.0, 2.0, 0.0])
    assert per_token[0][2]["clip_c"].item() == 0.25
    # A = +1 is untouched by the cap: -min(r, clip(r)) = -0.5, -1, -1.2, -1.2
    assert per_token[1][0] == pytest.approx(-0.5 - 1 - 1.2 - 1.2)
    assert per_token[1][1] == pytest.approx([-0.5, -1.0, 0.0, 0.0])
    assert per_token[1][2]["clip_c"].item() == 0.0


def test_sapo_on_policy_is_the_policy_gradient_and_fades_off_policy():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 3)
    for a in [1.5, -1.5]:
        adv = torch.tensor([a], dtype=torch.float64)
        sapo, _ = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, objective="sapo")
        pg, _ = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, objective="pg")
        g_sapo, g_pg = torch.autograd.grad(sapo, logp)[0], torch.autograd.grad(pg, logp)[0]
        assert torch.allclose(g_sapo, g_pg, rtol=1e-12)  # at r = 1 the gate's weight 4 p (1 - p) is 1
        assert flat(g_pg) == pytest.approx([-a / 3] * 3)
    # off policy: weight 4 p (1 - p) r with p = sigmoid(tau (r - 1)); r = 3, A = -1, tau_neg 1.05
    old = logp.detach() - math.log(3.0)
    loss, _ = grpo_loss(logp, old, None, torch.tensor([-1.0], dtype=torch.float64), mask, beta=0.0, objective="sapo")
    g, = torch.autograd.grad(loss, logp)
    p = 1 / (1 + math.exp(-1.05 * 2))
    assert flat(g) == pytest.approx([4 * p * (1 - p) * 3 / 3] * 3)
    assert 4 * p * (1 - p) < 0.5  # at three times pi_old, less than half of the on-policy weight


def test_top_entropy_keeps_the_gradient_on_the_high_entropy_tokens_and_the_kl_on_all():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], dtype=torch.float64, requires_grad=True)
    ref = logp.detach() - 0.2
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    entropy = torch.tensor([[0.1, 1.3, 0.5], [0.9, 5.0, 5.0]], dtype=torch.float64)  # padding: high, ignored
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    # valid entropies 0.1, 0.5, 0.9, 1.3: the median (the 1 - 0.5 quantile) is 0.7: 1.3 and 0.9 are kept
    loss, m = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, top_entropy=0.5, entropy=entropy)
    g, = torch.autograd.grad(loss, logp)
    assert flat(g) == pytest.approx([0.0, -1 / 6, 0.0, 1 / 2, 0.0, 0.0])
    assert m["entropy_cut"].item() == pytest.approx(0.7) and m["entropy_kept"].item() == 0.5
    loss, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.1, top_entropy=0.5, entropy=entropy)
    g, = torch.autograd.grad(loss, logp)
    kl_grad = 0.1 * (1 - math.exp(-0.2))  # d/dlogp of e^d - d - 1 with d = ref - logp = -0.2
    # seq-mean: each token's term / its completion's length / 2 completions
    assert flat(g) == pytest.approx([kl_grad / 6, (-1 + kl_grad) / 6, kl_grad / 6, (1 + kl_grad) / 2, 0.0, 0.0])
    # a cut given from outside (the whole batch's, in grpo.py) is used as it is
    _, m = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, top_entropy=0.5, entropy=entropy,
                     entropy_cut=0.2)
    assert m["entropy_kept"].item() == 0.75


def test_truncated_importance_sampling_by_hand_and_the_mismatch_logged():
    # one completion of two tokens, pi_old / pi_sampler = 1.5 and 0.5; A = +1, on policy
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    sampler = logp.detach() - torch.tensor([[math.log(1.5), math.log(0.5)]], dtype=torch.float64)
    adv, mask = torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2)
    got = {}
    for level in ["token", "sequence"]:
        loss, m = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, sampler_logp=sampler, tis=1.2,
                            tis_level=level)
        got[level] = (flat(torch.autograd.grad(loss, logp)[0]), m)
    assert got["token"][0] == pytest.approx([-1.2 / 2, -0.5 / 2])  # min(1.5, 1.2), min(0.5, 1.2)
    assert got["sequence"][0] == pytest.approx([-0.75 / 2, -0.75 / 2])  # min(1.5 x 0.5, 1.2)
    assert got["token"][1]["tis_cut"].item() == 0.5 and got["sequence"][1]["tis_cut"].item() == 0.0
    d = [math.log(1.5), math.log(0.5)]
    m = got["token"][1]
    assert m["sampler_diff"].item() == pytest.approx(sum(abs(x) for x in d) / 2)
    assert m["sampler_kl"].item() == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 2)
    # without a cap, the mismatch is logged and nothing is weighted
    plain, _ = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, sampler_logp=sampler)
    assert flat(torch.autograd.grad(plain, logp)[0]) == pytest.approx([-0.5, -0.5])


def test_the_quantile_is_torchs_without_its_size_limit():
    from nanor1.common import quantile

    x = torch.rand(1001, dtype=torch.float64)
    for q in [0.0, 0.2, 0.5, 0.8, 1.0]:
        assert quantile(x, q).item() == pytest.approx(torch.quantile(x, q).item(), rel=1e-12)
    assert quantile(torch.tensor([3.0]), 0.8).item() == 3.0


def test_unknown_objective_or_levels_and_missing_inputs_are_refused():
    logp, old, ref, sampler, adv, mask, entropy = batch()
    for kw, word in [(dict(objective="ppo2"), "objective"), (dict(ratio_level="word"), "ratio_level"),
                     (dict(sampler_logp=sampler, tis=2.0, tis_level="batch"), "tis_level"),
                     (dict(tis=2.0), "sampler_logp"), (dict(top_entropy=0.2), "entropy"),
                     (dict(top_entropy=0.2, entropy=entropy, ratio_level="sequence"), "sequence-level")]:
        with pytest.raises(ValueError, match=word):
            grpo_loss(logp, old, None, adv, mask, beta=0.0, **kw)


# ------------------------------------------------------------------------- the flags, in grpo.py runs

import json  # noqa: E402
import shutil  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

import grpo  # noqa: E402

TIMING = {"s", "sample_s", "score_s", "ref_s", "update_s", "tok/s"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(12):
            a, b = (7 * i) % 23, (5 * i) % 19
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


def two_steps(tiny_dir, prompts, out, *extra):
    """Two steps of grpo.py on the tiny model, a checkpoint after each -> (history, final weights)."""
    history = grpo.main(["--model", tiny_dir, "--data", str(prompts), "--out", str(out), "--device", "cpu",
                         "--prompts-per-step", "4", "--group", "4", "--max-new-tokens", "8", "--lr", "3e-2",
                         "--rewards", "digits", "--temperature", "1.2", "--beta", "0.04", "--num-steps", "2",
                         "--save-every", "1", "--sample-every", "0", *extra])
    return history, load_file(out / "step-000002" / "model.safetensors")


def records(out):
    """metrics.jsonl: the run's flags (its first record), then the steps' records without their timings."""
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return lines[0]["args"], [{k: v for k, v in r.items() if k not in TIMING} for r in lines if "step" in r]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


MU2 = ["--num-iterations", "2"]  # off policy from the second pass: where the objectives part ways


@pytest.mark.parametrize("flags, logged", [
    (["--ratio-level", "sequence", *MU2], set()),
    (["--objective", "cispo", *MU2], set()),
    (["--objective", "sapo", "--sapo-tau-neg", "2", *MU2], set()),
    (["--objective", "pg"], set()),
    (["--clip-c", "1.5", "--clip-low", "1", *MU2], {"clip_c"}),
    (["--baseline", "loo", "--scale", "batch"], set()),
    (["--top-entropy", "0.3"], {"entropy_cut", "entropy_kept"}),
    (["--sample-dtype", "bfloat16", "--tis", "1.0001", "--tis-level", "token"], {"tis_cut"}),  # C near 1: it acts
], ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_each_flag_runs_is_logged_and_resumes_bitwise(tiny_dir, prompts, tmp_path, toy, flags, logged):
    history, weights = two_steps(tiny_dir, prompts, tmp_path / "full", *flags)
    header = records(tmp_path / "full")[0]
    for flag, value in zip(flags[::2], flags[1::2]):  # the flags, in the run's first record
        name = flag[2:].replace("-", "_")
        assert str(header[name]) == value or header[name] == float(value), flag
    for key in {"sampler_diff", "sampler_kl"} | logged:
        assert all(r[key] is not None and math.isfinite(r[key]) for r in history), key
    for key in logged - {"entropy_cut"}:  # a share of tokens: the cap, the truncation or the selection acted
        assert any(r[key] > 0 for r in history), key
    assert all((r["clip"] is None) == (header["objective"] in ("sapo", "pg")) for r in history)
    # stopped after step 1, resumed: the same step 2, bitwise
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "step-000002")
    two_steps(tiny_dir, prompts, tmp_path / "resumed", *flags, "--resume")
    assert same(weights, load_file(tmp_path / "resumed" / "step-000002" / "model.safetensors"))
    assert records(tmp_path / "full")[1] == records(tmp_path / "resumed")[1]


def gap(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_the_objectives_part_ways_only_off_policy(tiny_dir, prompts, tmp_path, toy):
    """At one update per batch every ratio is 1: PPO-clip, GSPO, CISPO, SAPO and plain PG take the
    same step (their gradients are all A grad log pi there), but for rounding, which AdamW then
    lifts to about 1e-5 on the gradient's near-zero entries. From the second pass on they differ."""
    _, grpo_mu1 = two_steps(tiny_dir, prompts, tmp_path / "clip1")
    for flags in [["--objective", "pg"], ["--objective", "cispo"], ["--objective", "sapo"],
                  ["--ratio-level", "sequence"]]:
        _, w = two_steps(tiny_dir, prompts, tmp_path / flags[1], *flags)
        assert gap(grpo_mu1, w) < 1e-4, flags  # measured: 0, 0, 2e-6, 4e-5
    _, grpo_mu2 = two_steps(tiny_dir, prompts, tmp_path / "clip2", *MU2)
    for flags in [["--objective", "cispo"], ["--objective", "sapo"], ["--ratio-level", "sequence"]]:
        _, w = two_steps(tiny_dir, prompts, tmp_path / (flags[1] + "2"), *flags, *MU2)
        assert gap(grpo_mu2, w) > 1e-2, flags  # measured: about 0.15 each
    # the advantages' and the token selection's variants change the step at once
    for flags in [["--baseline", "loo"], ["--scale", "batch"], ["--top-entropy", "0.3"]]:
        _, w = two_steps(tiny_dir, prompts, tmp_path / flags[1], *flags)
        assert gap(grpo_mu1, w) > 1e-2, flags  # measured: 0.04 to 0.12


def test_the_sampler_mismatch_is_rounding_alone_without_a_bf16_sampler(tiny_dir, prompts, tmp_path, toy):
    same_weights, _ = two_steps(tiny_dir, prompts, tmp_path / "same")
    bf16, _ = two_steps(tiny_dir, prompts, tmp_path / "bf16", "--sample-dtype", "bfloat16")
    for r in same_weights:  # KV-cache decoding and one full forward round differently, in float32's last digits
        assert r["sampler_diff"] < 1e-5 and abs(r["sampler_kl"]) < 1e-9
    for r in bf16:  # bfloat16 keeps 8 bits of mantissa: pi_sampler differs from pi_old
        assert r["sampler_diff"] > 1e-4 and r["sampler_kl"] > 1e-8


@pytest.mark.parametrize("flags, named", [
    (["--ratio-level", "sequence", "--objective", "pg"], "--ratio-level"),
    (["--objective", "pg", "--num-iterations", "2"], "--objective pg"),
    (["--objective", "sapo", "--clip-high", "0.3"], "--clip-low and --clip-high"),
    (["--clip-c", "3", "--objective", "cispo"], "--clip-c"),
    (["--clip-c", "0.5"], "--clip-c"),
    (["--sapo-tau-pos", "2"], "--sapo-tau-pos"),
    (["--top-entropy", "0"], "--top-entropy"),
    (["--tis", "2"], "--tis"),
    (["--tis", "0.5", "--sample-dtype", "bfloat16"], "--tis"),
    (["--baseline", "median"], "--baseline"),
    (["--top-entropy", "0.2", "--ratio-level", "sequence"], "--top-entropy"),
    (["--tis-level", "token", "--sample-dtype", "bfloat16"], "--tis-level"),
])
def test_flags_that_mean_nothing_together_are_one_error(capsys, tiny_dir, prompts, tmp_path, flags, named):
    with pytest.raises(SystemExit) as e:
        grpo.get_args(["--model", tiny_dir, "--data", str(prompts), "--out", str(tmp_path), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err


def test_each_paper_clip_range_is_the_default_of_its_variant(tiny_dir, prompts, tmp_path):
    args = lambda *f: grpo.get_args(["--model", tiny_dir, "--data", str(prompts), *f])  # noqa: E731
    assert (args().clip_low, args().clip_high) == (0.2, 0.2)
    gspo = args("--ratio-level", "sequence")
    assert (gspo.clip_low, gspo.clip_high) == (3e-4, 4e-4)  # GSPO section 5.1
    cispo = args("--objective", "cispo")
    assert (cispo.clip_low, cispo.clip_high) == (1.0, 4.0)  # no lower bound; a weight of at most 5
    assert args("--ratio-level", "sequence", "--clip-high", "0.01").clip_high == 0.01  # given: kept
    sapo = args("--objective", "sapo")
    assert (sapo.sapo_tau_pos, sapo.sapo_tau_neg) == (1.0, 1.05)
