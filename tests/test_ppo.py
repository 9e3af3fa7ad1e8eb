"""ppo.py: GAE, the KL in the reward, whitening and the two losses by hand; the value model's
reading position and its separate gradients; two steps, exact resume, two processes, bad flags."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ppo
from ppo import ValueModel, gae, policy_loss, token_rewards, value_loss, whiten

CPU = torch.device("cpu")

# ------------------------------------------------------------------------- the algorithm, by hand


def test_gae_by_hand_with_gamma_and_lambda_below_one():
    # completion 0: 3 tokens; completion 1: 2 tokens, then padding whose junk must not leak in
    r = torch.tensor([[0.1, -0.2, 1.0], [0.0, 2.0, 5.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.4, 0.8], [1.0, 0.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    # completion 0: delta_2 = 1.0 - 0.8 = 0.2; delta_1 = -0.2 + 0.9 * 0.8 - 0.4 = 0.12;
    # delta_0 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04; A_2 = 0.2, A_1 = 0.12 + 0.72 * 0.2 = 0.264,
    # A_0 = -0.04 + 0.72 * 0.264 = 0.15008
    # completion 1: delta_1 = 2 - 0.5 = 1.5 (V = 0 after the end); delta_0 = 0.9 * 0.5 - 1 = -0.55;
    # A_1 = 1.5, A_0 = -0.55 + 0.72 * 1.5 = 0.53
    assert torch.allclose(adv, torch.tensor([[0.15008, 0.264, 0.2], [0.53, 1.5, 0.0]], dtype=torch.float64))
    assert torch.allclose(ret, torch.tensor([[0.65008, 0.664, 1.0], [1.53, 2.0, 0.0]], dtype=torch.float64))


def test_gae_at_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value():
    r = torch.tensor([[0.0, -0.1, 0.3, 1.0]])
    v = torch.tensor([[0.2, 0.7, -0.4, 0.1]])
    adv, ret = gae(r, v, torch.ones(1, 4), 1.0, 1.0)
    to_go = torch.tensor([[1.2, 1.2, 1.3, 1.0]])  # sums of the rewards from t to the end
    assert torch.allclose(ret, to_go) and torch.allclose(adv, to_go - v)
    adv0, _ = gae(r, v, torch.ones(1, 4), 1.0, 0.0)  # lambda 0: one-step TD errors
    assert torch.allclose(adv0, torch.tensor([[0.0 + 0.7 - 0.2, -0.1 - 0.4 - 0.7, 0.3 + 0.1 + 0.4, 1.0 - 0.1]]))


def test_the_kl_penalty_is_on_every_token_and_the_rule_reward_on_the_last():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -1.0, 7.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])  # the last completion is empty: no reward to place
    r = token_rewards(torch.tensor([1.0, 2.0, 3.0]), old, ref, mask, beta=0.1)
    # -0.1 (old - ref) on each token: (-0.05, 0, 0.1) and (0, -0.05); the score added on the last
    assert torch.allclose(r, torch.tensor([[-0.05, 0.0, 1.1], [0.0, 1.95, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(token_rewards(torch.tensor([1.0, 2.0, 3.0]), old, None, mask, beta=0.0),
                       torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
    # so with gamma = lambda = 1 and V = 0 a token's advantage is the score minus beta x the KL
    # of the tokens from it on: the first token pays for the whole completion's KL
    adv, _ = gae(r, torch.zeros(3, 3), mask)
    assert torch.allclose(adv[0], torch.tensor([1.05, 1.1, 1.1]))


def test_whitening_over_the_masked_tokens_against_numpy():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    kept = np.array([1.0, 2.0, 3.0, 4.0])
    want = (kept - kept.mean()) / kept.std(ddof=1)  # +-1.1619, +-0.3873
    got = whiten(x, mask, CPU)
    assert np.allclose(got[mask.bool()].numpy(), want, atol=1e-6)
    assert torch.equal(got[~mask.bool()], torch.zeros(2))


def test_the_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.0]])).requires_grad_()  # ratios 1.5, 1.5, 0.5, 1 (old = 0)
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    loss, m = policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4), 0.2, 0.2)
    # per token -min(rA, clip(r)A): -1.2 (clipped above), 1.5, 0.8 (clipped below), -2
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 2.0) / 4)
    loss.backward()
    # d/dlogp = -A r where the unclipped term is the minimum, 0 where the clip took it
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 1.5, 0.0, -2.0]]) / 4)
    assert m["clip"].item() == pytest.approx(2 / 4) and m["ratio"].item() == pytest.approx(4.5 / 4)


def test_the_clipped_value_loss_by_hand():
    v = torch.tensor([[1.0, 0.0, 0.6, 3.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    ret = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last is padding
    loss, m = value_loss(v, old, ret, mask, clip=0.2)
    # token 0: (1 - 2)^2 = 1, clipped V 0.7: 1.69 -> 1.69; token 1: 1, clipped 0.3: 0.49 -> 1;
    # token 2: inside the range, 0.36 either way
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1 + 0.36) / 3)
    loss.backward()
    # the clipped branch has no gradient (token 0); the others (V - R) / 3
    assert torch.allclose(v.grad, torch.tensor([[0.0, -1 / 3, 0.6 / 3, 0.0]]))
    assert m["vclip"].item() == pytest.approx(1 / 3)  # token 0's clipped error was the larger
    plain, _ = value_loss(v, old, ret, mask, clip=0.0)
    assert plain.item() == pytest.approx(0.5 * (1 + 1 + 0.36) / 3)


def test_the_value_is_read_before_each_token_and_trains_apart_from_the_policy(tiny):
    model, tok = tiny
    policy = __import__("copy").deepcopy(model).train()
    critic = ValueModel(policy)
    assert all(p.data_ptr() != q.data_ptr() for p in critic.parameters() for q in policy.parameters())
    torch.nn.init.normal_(critic.head.weight, std=1.0)
    p_ids, p_mask = torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1]])  # left padding
    ids, mask = torch.tensor([[20, 21, 22]]), torch.ones(1, 3, dtype=torch.long)
    v = critic(p_ids, p_mask, ids, mask)  # (1, 3)
    changed = critic(p_ids, p_mask, torch.tensor([[20, 99, 22]]), mask)
    # V(s_t) has seen the tokens before t: changing token 1 leaves V(s_0), V(s_1) and moves V(s_2)
    assert torch.equal(v[:, :2], changed[:, :2]) and not torch.allclose(v[:, 2], changed[:, 2])
    # V(s_0) is the prompt's value: the same with no completion token read yet
    assert torch.allclose(v[:, 0], critic(p_ids, p_mask, ids[:, :1], mask[:, :1])[:, 0], atol=1e-6)
    loss, _ = value_loss(v, v.detach(), torch.ones(1, 3), mask)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
    assert all(p.grad is None for p in policy.parameters())  # the value loss never reaches the policy
    fresh = ValueModel(policy)  # its head starts at zero: V = 0 everywhere
    assert torch.equal(fresh(p_ids, p_mask, ids, mask), torch.zeros(1, 3))

# ------------------------------------------------------------------------- ppo.py runs

TIMING = {"s", "sample_s", "score_s", "ref_s", "critic_s", "update_s", "tok/s"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            a, b = (7 * i) % 23, (5 * i) % 19
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


def two_steps(tiny_dir, prompts, out, *extra):
    """Two steps of ppo.py on the tiny model, a checkpoint after each -> (history, final weights)."""
    history = ppo.main(["--model", tiny_dir, "--data", str(prompts), "--out", str(out), "--device", "cpu",
                        "--prompts-per-step", "8", "--max-new-tokens", "8", "--lr", "3e-2", "--critic-lr", "3e-2",
                        "--rewards", "digits", "--temperature", "1.2", "--beta", "0.04", "--num-steps", "2",
                        "--micro-batch-size", "3", "--save-every", "1", "--sample-every", "0", *extra])
    return history, load_file(out / "step-000002" / "model.safetensors")


def records(out):
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines if "step" in r]


def critic_of(out):
    return torch.load(out / "trainer_state.pt", weights_only=False)["critic"]


def test_two_steps_train_both_models_and_resume_bitwise(tiny_dir, prompts, tmp_path, toy):
    history, weights = two_steps(tiny_dir, prompts, tmp_path / "full", "--ppo-epochs", "2", "--value-clip", "0.01")
    first = load_file(tmp_path / "full" / "step-000001" / "model.safetensors")
    assert any(not torch.equal(weights[k], first[k]) for k in weights)  # the policy trained
    c1, c2 = critic_of(tmp_path / "full" / "step-000001"), critic_of(tmp_path / "full" / "step-000002")
    assert c1["head.weight"].abs().sum() > 0  # it started at zero
    assert any(not torch.equal(c1[k], c2[k]) for k in c1 if k.startswith("body."))  # the body learns from step 2
    for r in history:
        for key in ["vloss", "ev", "value", "gnorm", "vgnorm", "kl", "ratio", "clip", "vclip", "entropy"]:
            assert r[key] is not None and math.isfinite(r[key]), key
        assert r["zero_var"] is None  # single samples: no groups
    assert history[1]["kl"] > 0  # the policy moved from the reference after step 1
    assert any(r["vclip"] > 0 for r in history)  # the second pass moved values past 0.01 towards the returns
    # stopped after step 1, resumed: the same step 2, bitwise, the value model and its optimizer too
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "step-000002")
    two_steps(tiny_dir, prompts, tmp_path / "resumed", "--ppo-epochs", "2", "--value-clip", "0.01", "--resume")
    resumed = load_file(tmp_path / "resumed" / "step-000002" / "model.safetensors")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    c2r = critic_of(tmp_path / "resumed" / "step-000002")
    assert all(torch.equal(c2[k], c2r[k]) for k in c2)
    assert records(tmp_path / "full") == records(tmp_path / "resumed")


def test_critic_warmup_trains_the_value_model_alone(tiny_dir, prompts, tmp_path, toy):
    history, weights = two_steps(tiny_dir, prompts, tmp_path / "w", "--critic-warmup", "1", "--beta", "0")
    first = load_file(tmp_path / "w" / "step-000001" / "model.safetensors")
    start = load_file(f"{tiny_dir}/model.safetensors")
    assert all(torch.equal(first[k], start[k]) for k in first)  # step 1: the policy untouched
    assert history[0]["gnorm"] is None and history[0]["vgnorm"] > 0
    assert any(not torch.equal(weights[k], first[k]) for k in weights)  # step 2: it trains
    assert history[1]["kl"] == 0.0  # --beta 0: no reference, no KL


@pytest.mark.parametrize("flags, named", [
    (["--lam", "1.5"], "--lam"),
    (["--gamma", "0"], "--gamma"),
    (["--value-clip", "-0.1"], "--value-clip"),
    (["--ppo-epochs", "0"], "--ppo-epochs"),
    (["--critic-lr", "-1"], "--critic-lr"),
    (["--critic-warmup", "100"], "--critic-warmup"),
    (["--fsdp"], "--fsdp"),
    (["--lora-rank", "8"], "--lora-rank"),
])
def test_bad_flags_are_one_error(capsys, tiny_dir, prompts, tmp_path, flags, named):
    with pytest.raises(SystemExit) as e:
        ppo.get_args(["--model", tiny_dir, "--data", str(prompts), "--out", str(tmp_path), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
