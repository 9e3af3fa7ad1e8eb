"""grpo.py end to end on the tiny model: outputs, checkpoints, the update's bookkeeping, bad input."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import grpo
import rewards as R
from conftest import digits
from nanor1 import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(d / "train.jsonl", "w") as f:
        for i in range(40):
            a, b = (7 * i) % 23, (5 * i) % 19
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    with open(d / "test.jsonl", "w") as f:
        for a, b in [(3, 4), (10, 12), (8, 8)]:
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return d


def run(tiny_dir, data, out, *extra):
    argv = ["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(out), "--device", "cpu",
            "--prompts-per-step", "4", "--group", "8", "--max-new-tokens", "8", "--lr", "1e-2",
            "--micro-batch-size", "32", "--sample-every", "0", *extra]
    return grpo.main(argv)


def weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ------------------------------------------------------------------------- outputs

def test_run_writes_metrics_samples_and_loadable_checkpoints(tiny_dir, data, tmp_path, toy):
    out = tmp_path / "run"
    run(tiny_dir, data, out, "--num-steps", "3", "--rewards", "digits,format:0.5", "--save-every", "2",
        "--sample-every", "1", "--eval-data", str(data / "test.jsonl"), "--eval-every", "2", "--eval-samples", "2")
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert lines[0]["args"]["rewards"] == "digits,format:0.5"
    steps = [l for l in lines if "reward" in l]
    evals = [l for l in lines if "eval_pass@1" in l]
    assert [l["step"] for l in steps] == [1, 2, 3]
    assert [l["step"] for l in evals] == [0, 2, 3]  # at start, on the cadence, at the end
    for key in ["reward", "digits", "format", "len", "trunc", "zero_var", "kl", "clip", "ratio", "entropy",
                "gnorm", "lr", "tok/s", "s"]:
        assert key in steps[0], key
    for l in steps:  # the total is the weighted sum of the parts
        assert l["reward"] == pytest.approx(l["digits"] + 0.5 * l["format"])
        assert 0 <= l["trunc"] <= 1 and 1 <= l["len"] <= 8
    samples = [json.loads(l) for l in open(out / "samples.jsonl")]
    assert len(samples) == 3 * 8 and {"prompt", "completion", "reward", "truncated"} <= set(samples[0])
    assert sorted(p for p in os.listdir(out) if p.startswith("step")) == ["step-000002", "step-000003"]
    assert json.load(open(out / "step-000003" / "args.json"))["num_steps"] == 3
    before, after = weights(tiny_dir), weights(out / "step-000003")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_reward_moves_on_a_learnable_task(tiny_dir, data, tmp_path, toy):
    history = run(tiny_dir, data, tmp_path / "run", "--num-steps", "20", "--rewards", "digits", "--beta", "0.04")
    start = sum(h["reward"] for h in history[:3]) / 3
    end = sum(h["reward"] for h in history[-3:]) / 3
    assert start < 0.1 and end > 0.5, (start, end)
    assert max(h["kl"] for h in history) > 0  # the policy moved away from the reference


@pytest.mark.parametrize("agg, extra", [("seq-mean", []), ("token-mean", []), ("seq-sum", []),
                                        ("seq-mean", ["--mask-truncated"]), ("token-mean", ["--mask-truncated"])])
def test_micro_batches_give_the_same_gradient_as_one_batch(tiny_dir, data, tmp_path, toy, monkeypatch, agg, extra):
    """The per-micro-batch weights make gradient accumulation exact for every aggregation.

    AdamW's first step is about lr * sign(gradient), which float noise can flip; with plain SGD
    at lr 1 the change of the weights is the gradient itself, so that is what we compare.
    """
    monkeypatch.setattr(grpo.torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=1.0))
    flags = ["--num-steps", "1", "--rewards", "digits", "--agg", agg, "--beta", "0.04", "--grad-clip", "0", *extra]
    run(tiny_dir, data, tmp_path / "one", *flags, "--micro-batch-size", "32")
    run(tiny_dir, data, tmp_path / "many", *flags, "--micro-batch-size", "5")
    init = weights(tiny_dir)
    a, b = weights(tmp_path / "one" / "step-000001"), weights(tmp_path / "many" / "step-000001")
    for k in a:
        ga, gb = init[k] - a[k], init[k] - b[k]
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-7), k
    assert any(ga.abs().max() > 1e-4 for ga in (init[k] - a[k] for k in a))


def test_grad_checkpointing_gives_the_same_gradient(tiny_dir, data, tmp_path, toy, monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setattr(grpo.torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=1.0))
    calls = []
    real = modeling_qwen2.Qwen2MLP.forward  # inside the checkpointed layer (patching the layer would unwrap it)
    monkeypatch.setattr(modeling_qwen2.Qwen2MLP, "forward",
                        lambda self, *a, **k: calls.append(torch.is_grad_enabled()) or real(self, *a, **k))
    flags = ["--num-steps", "1", "--rewards", "digits", "--grad-clip", "0", "--micro-batch-size", "8", "--beta", "0"]
    run(tiny_dir, data, tmp_path / "plain", *flags)
    plain_calls, calls[:] = len(calls), []
    run(tiny_dir, data, tmp_path / "ckpt", *flags, "--grad-checkpointing")
    assert len(calls) == plain_calls + 4 * 2  # each of 4 micro-batches runs its 2 layers again in backward
    a, b = weights(tmp_path / "plain" / "step-000001"), weights(tmp_path / "ckpt" / "step-000001")
    init = weights(tiny_dir)
    for k in a:
        assert torch.allclose(init[k] - a[k], init[k] - b[k], rtol=1e-4, atol=1e-7), k


def test_bf16_compute_keeps_float32_weights_that_train(tiny_dir, data, tmp_path, toy):
    h = run(tiny_dir, data, tmp_path / "bf16", "--num-steps", "2", "--rewards", "digits", "--dtype", "bfloat16",
            "--lr", "1e-6")
    after = weights(tmp_path / "bf16" / "step-000002")
    before = weights(tiny_dir)
    assert all(v.dtype == torch.float32 for v in after.values())
    # a 1e-6 step is below bf16's resolution: it survives only because the weights are float32
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(h_["gnorm"] > 0 for h_ in h)


def test_sampling_from_a_bf16_copy_of_the_current_weights(tiny_dir, data, tmp_path, toy, monkeypatch):
    seen = []  # (the sampling model, a copy of its weights) at each rollout
    rollout = grpo.sampling.rollout

    def spy(model, *a, **k):
        seen.append((model, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return rollout(model, *a, **k)

    monkeypatch.setattr(grpo.sampling, "rollout", spy)
    h = run(tiny_dir, data, tmp_path / "copy", "--num-steps", "3", "--rewards", "digits", "--sample-dtype", "bfloat16",
            "--save-every", "1")
    assert len(seen) == 3 and len({id(m) for m, _ in seen}) == 1  # one copy, refreshed in place
    for step, (_, sampled) in enumerate(seen):  # step s samples from the weights step s - 1 left, in bf16
        start = weights(tiny_dir if step == 0 else tmp_path / "copy" / f"step-{step:06d}")
        assert all(torch.equal(sampled[n], start[n].to(torch.bfloat16)) for n in sampled)
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "copy" / "step-000003").values())
    assert h[0]["kl"] == 0 and all(h_["gnorm"] > 0 for h_ in h)


def test_warmup_and_accuracy_logged_when_not_trained_on(tiny_dir, data, tmp_path, toy):
    h = run(tiny_dir, data, tmp_path / "run", "--num-steps", "5", "--rewards", "digits", "--warmup-steps", "4",
            "--lr", "1e-3", "--beta", "0")
    assert [r["lr"] for r in h] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert all(r["accuracy"] == 0.0 for r in h)  # a random model is never right, and it is still measured


def test_num_iterations_reuses_sampling_logprobs_as_old(tiny_dir, data, tmp_path, toy, monkeypatch):
    calls = []
    real = grpo.completion_logprobs
    monkeypatch.setattr(grpo, "completion_logprobs", lambda m, *a, **k: calls.append(m.training) or real(m, *a, **k))
    h1 = run(tiny_dir, data, tmp_path / "mu1", "--num-steps", "2", "--rewards", "digits", "--micro-batch-size", "8")
    # 32 completions in micro-batches of 8: 4 policy passes and 4 reference passes per step, nothing for old_logp
    assert calls.count(True) == 2 * 4 and calls.count(False) == 2 * 4
    h3 = run(tiny_dir, data, tmp_path / "mu3", "--num-steps", "2", "--rewards", "digits", "--num-iterations", "3")
    assert all(h["ratio"] == pytest.approx(1.0, abs=1e-6) and h["clip"] == 0 for h in h1)
    # passes 2 and 3 see a moved policy against the fixed sampling-time log-probs
    assert all(abs(h["ratio"] - 1) > 1e-5 for h in h3)


def test_mask_truncated_drops_completions_from_the_loss(tiny_dir, data, tmp_path, toy, monkeypatch):
    seen = []
    real = grpo.completion_logprobs
    monkeypatch.setattr(grpo, "completion_logprobs", lambda m, p, pm, ids, mask, *a, **k:
                        seen.append((ids, mask)) or real(m, p, pm, ids, mask, *a, **k))
    h = run(tiny_dir, data, tmp_path / "run", "--num-steps", "1", "--rewards", "digits", "--mask-truncated",
            "--beta", "0")
    eos = models.load_model(tiny_dir)[1].eos_token_id
    ended = [bool((ids[i] == eos).any()) for ids, _ in seen for i in range(len(ids))]
    used = [bool(mask[i].any()) for _, mask in seen for i in range(len(mask))]
    assert used == ended  # a completion takes part in the loss exactly when it ended
    assert 0 < h[0]["trunc"] < 1 and sum(used) == round(32 * (1 - h[0]["trunc"]))


def test_dynamic_sampling_at_its_cap_logs_no_update_and_warns(tiny_dir, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(R.REWARDS, "const", lambda c, ex: 1.0)  # no group ever has variance
    out = tmp_path / "run"
    h = run(tiny_dir, data, out, "--num-steps", "1", "--rewards", "const", "--dynamic-sampling",
            "--max-sampling-rounds", "2")
    assert h[0]["rounds"] == 2 and h[0]["groups"] == 0
    assert all(h[0][k] is None for k in ["kl", "clip", "ratio", "entropy", "gnorm"])
    text = capsys.readouterr()
    assert "| rounds 2 | groups 0/4 |" in text.out and "| kl - |" in text.out
    assert "only 0 of 4 groups had reward variance after 2 rounds" in text.err
    for line in open(out / "metrics.jsonl"):  # strict JSON: null, never NaN
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    before, after = weights(tiny_dir), weights(out / "step-000001")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_warnings_for_truncation_and_zero_variance(tiny_dir, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(R.REWARDS, "const", lambda c, ex: 0.0)
    run(tiny_dir, data, tmp_path / "run", "--num-steps", "2", "--rewards", "const")
    text = capsys.readouterr().err  # warnings go to stderr: stdout is the log, one line a step
    assert text.count("of completions hit --max-new-tokens 8") == 1  # warned once, not every step
    assert text.count("100% of groups have equal rewards") == 1


def test_evaluation_pass_at_1_and_it_does_not_change_training(tiny_dir, data, tmp_path, monkeypatch, toy):
    # an accuracy that is 1 exactly for the questions whose answer is 7 or 16: 2 of 3 eval prompts
    monkeypatch.setitem(R.REWARDS, "accuracy", lambda c, ex: float(ex["answer"] in ("7", "16")))
    plain = run(tiny_dir, data, tmp_path / "plain", "--num-steps", "2", "--rewards", "digits")
    evald = run(tiny_dir, data, tmp_path / "eval", "--num-steps", "2", "--rewards", "digits", "--eval-data",
                str(data / "test.jsonl"), "--eval-samples", "3", "--eval-every", "1")
    assert [h["reward"] for h in plain] == [h["reward"] for h in evald]  # eval draws from its own generator
    evals = [json.loads(l) for l in open(tmp_path / "eval" / "metrics.jsonl") if "eval_pass@1" in l]
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert all(e["eval_pass@1"] == pytest.approx(2 / 3) for e in evals)


def test_dynamic_sampling_trains_only_on_groups_with_variance(tiny_dir, data, tmp_path, monkeypatch):
    # prompts with an odd answer get a constant reward: their groups carry no signal
    monkeypatch.setitem(R.REWARDS, "half", lambda c, ex: 0.0 if int(ex["answer"]) % 2 else digits(c, ex))
    seen = []
    real = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda r, g, *a: seen.append(r.view(-1, g)) or real(r, g, *a))
    h = run(tiny_dir, data, tmp_path / "run", "--num-steps", "3", "--rewards", "half", "--dynamic-sampling",
            "--max-sampling-rounds", "6")
    for groups in seen:
        assert (groups.std(dim=1) > 0).all()  # every group that reached the loss is informative
    assert all(r["groups"] == 4 for r in h) and any(r["rounds"] > 1 for r in h)
    assert all(r["zero_var"] > 0 for r in h)  # logged over everything sampled, before the filter


def test_ref_reset_copies_the_policy_into_the_reference(tiny_dir, data, tmp_path, toy):
    # temperature 0.7: the reference's log-probs must use it too, or the KL is not 0 at the start
    keep = run(tiny_dir, data, tmp_path / "keep", "--num-steps", "3", "--rewards", "digits", "--temperature", "0.7")
    reset = run(tiny_dir, data, tmp_path / "reset", "--num-steps", "3", "--rewards", "digits", "--ref-reset-every", "1",
                "--temperature", "0.7")
    assert keep[0]["kl"] == 0 and keep[2]["kl"] > 0  # step 1 starts from the reference itself
    assert all(r["kl"] == pytest.approx(0, abs=1e-7) for r in reset)  # the reference is the step's own policy


# ------------------------------------------------------------------------- bad input

def fails(capsys, tiny_dir, data, tmp_path, *argv):
    with pytest.raises(SystemExit) as e:
        run(tiny_dir, data, tmp_path / "bad", *argv)
    assert e.value.code not in (0, None)
    return (e.value.code if isinstance(e.value.code, str) else "") + capsys.readouterr().err


def test_unknown_model_missing_file_malformed_line(capsys, tiny_dir, data, tmp_path):
    msg = fails(capsys, "Qwen2.5-no-such-size", data, tmp_path)
    assert "could not load model 'Qwen2.5-no-such-size'" in msg and "Qwen/Qwen2.5-no-such-size" in msg
    msg = fails(capsys, tiny_dir, data, tmp_path, "--data", str(tmp_path / "missing.jsonl"))
    assert "missing.jsonl: no such file" in msg
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": "4",}\n')
    assert "bad.jsonl:2: not valid JSON" in fails(capsys, tiny_dir, data, tmp_path, "--data", str(bad))
    bad.write_text('{"prompt": "1+1"}\n')
    assert "bad.jsonl:1: missing field 'answer'" in fails(capsys, tiny_dir, data, tmp_path, "--data", str(bad))


def test_prompt_longer_than_the_context(capsys, tiny_dir, data, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1", "answer": "1"}) + "\n" + json.dumps({"prompt": "7 " * 900, "answer": "7"}) + "\n")
    msg = fails(capsys, tiny_dir, data, tmp_path, "--data", str(long))
    assert "long.jsonl:2: the prompt is" in msg and "--max-new-tokens" in msg and "1024" in msg


def test_more_bad_input(capsys, tiny_dir, data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as e:
        grpo.main(["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(afile), "--device", "cpu"])
    assert "--out" in str(e.value.code) and "not a folder" in str(e.value.code)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "", "answer": "1"}) + "\n")
    assert "empty.jsonl:1: the prompt is empty" in fails(capsys, tiny_dir, data, tmp_path, "--data", str(empty),
                                                          "--template", "raw")
    msg = fails(capsys, tiny_dir, data, tmp_path, "--max-new-tokens", "1024")
    assert "--max-new-tokens 1024 leaves no room" in msg
    with pytest.raises(SystemExit) as e:  # --max-new-tokens left out: 1024 lowered to the tiny model's room
        grpo.main(["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(tmp_path / "o"),
                   "--device", "cpu", "--overlong-buffer", "1020"])
    assert re.fullmatch(r"error: --overlong-buffer 1020 is more than --max-new-tokens \d+, which the model's "
                        r"context allows", e.value.code)
    assert "--device gpu" in fails(capsys, tiny_dir, data, tmp_path, "--device", "gpu")


@pytest.mark.parametrize("flags, named", [
    (["--ref-reset-every", "5", "--beta", "0"], "--ref-reset-every"),
    (["--group", "1"], "--group"),
    (["--eval-every", "2"], "--eval-every"),
    (["--rewards", "accuracy,bogus"], "unknown reward 'bogus'"),
    (["--rewards", "accuracy:heavy"], "--rewards"),
    (["--temperature", "0"], "--temperature"),
    (["--clip-low", "-0.1"], "--clip-low"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--agg", "sum"], "--agg"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--lr", "-1"], "--lr"),
    (["--num-steps", "0"], "--num-steps"),
    (["--eval-temperature", "-1"], "--eval-temperature"),
    (["--eval-prompts", "2"], "--eval-prompts"),
    (["--lang", "klingon"], "--lang"),
    (["--overlong-buffer", "9"], "--overlong-buffer"),  # more than --max-new-tokens 8
    (["--sample-dtype", "float16"], "--sample-dtype"),
])
def test_contradictory_or_wrong_flags_name_the_flag(capsys, tiny_dir, data, tmp_path, flags, named):
    assert named in fails(capsys, tiny_dir, data, tmp_path, *flags)


def test_command_line_logs_one_step_a_line_when_redirected_and_fails_in_one_line(tiny_dir, data, tmp_path):
    """The real command, its output going to pipes as under `> log` or `| tee`: exit 0 with a
    checkpoint, each step's line whole on a line of its own, no progress bar redrawn into the
    log, nothing on stderr but the run's own warnings (none from transformers); bad input exits non-zero with
    one line: no traceback, no usage block."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model", tiny_dir, "--data", str(data / "train.jsonl"),
           "--out", str(tmp_path / "cli"), "--num-steps", "3", "--prompts-per-step", "2", "--group", "2",
           "--max-new-tokens", "4", "--device", "cpu", "--eval-data", str(data / "train.jsonl"), "--eval-prompts", "2"]
    ok = subprocess.run(cmd, capture_output=True, env=env, timeout=120)  # bytes: text mode would turn "\r" into "\n"
    out, err = ok.stdout.decode(), ok.stderr.decode()
    assert ok.returncode == 0, err
    assert all(line.startswith("warning: ") for line in err.splitlines()), err
    assert "\r" not in out + err
    lines = out.splitlines()
    steps = [line for line in lines if "| reward" in line]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(line.count("| reward") == 1 and line.endswith("s") for line in steps)
    assert lines[-1] == f"saved {tmp_path / 'cli' / 'step-000003'}" and sum(line.startswith("eval ") for line in lines) == 2
    for extra, code, said in [(["--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),  # argparse's
                              ([], 1, "holds a run")]:  # the script's own (test_more_bad_input has the others)
        bad = subprocess.run(cmd + extra, capture_output=True, text=True, env=env, timeout=120)
        assert bad.returncode == code and said in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
        assert bad.stderr.startswith("error: ") and "usage" not in bad.stderr


# ------------------------------------------------------------------------- rewards in the loop

def test_every_reward_component_is_logged_and_sees_lengths_and_defaults(tiny_dir, data, tmp_path, monkeypatch):
    seen = []

    def spy(completion, example):
        seen.append(dict(example))
        return 0.0
    monkeypatch.setitem(R.REWARDS, "spy", spy)
    out = tmp_path / "run"
    run(tiny_dir, data, out, "--num-steps", "2", "--rewards", "format,language:0.1,overlong:0.5,spy",
        "--overlong-buffer", "4", "--lang", "zh", "--sample-every", "1")
    steps = [l for l in map(json.loads, open(out / "metrics.jsonl")) if "reward" in l]
    for l in steps:
        assert {"format", "language", "overlong", "spy", "accuracy"} <= set(l)
        assert l["reward"] == pytest.approx(l["format"] + 0.1 * l["language"] + 0.5 * l["overlong"])
    assert len(seen) == 2 * 4 * 8
    for ex in seen:  # the example's own fields, the flags' defaults and the completion's length
        assert ex["lang"] == "zh" and ex["overlong_buffer"] == 4 and ex["max_tokens"] == 8
        assert 1 <= ex["num_tokens"] <= 8 and "prompt" in ex and "answer" in ex
    samples = [json.loads(l) for l in open(out / "samples.jsonl")]
    assert len(samples) == 2 * 8
    for s in samples:  # 8 tokens with a buffer of 4: n tokens cost (n - 4) / 4 past 4 tokens
        assert s["parts"]["overlong"] == pytest.approx(-max(0, s["num_tokens"] - 4) / 4)
    assert any(s["parts"]["overlong"] < 0 for s in samples)


def test_code_rewards_need_tests_in_the_data(capsys, tiny_dir, data, tmp_path):
    msg = fails(capsys, tiny_dir, data, tmp_path, "--rewards", "code")
    assert "train.jsonl:1: missing field 'tests'" in msg
