"""Several processes (torchrun): 2 processes on CPU over gloo against 1 process with the same
global batch. The processes are started by torch.multiprocessing with torchrun's variables
(RANK, WORLD_SIZE, MASTER_ADDR, ...), which is all torchrun does for a script."""

import json
import os
import shutil
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import grpo
import ppo
import rewards as R
import sft
from conftest import digits
from nanor1 import common, distributed, models, sampling


def fixed_rollout(model, tok, examples, prompt_ids, group, max_new_tokens, temperature, top_p, eos, score,
                  generator, defaults, warn=None, timings=None, logp=False, entropy=False):
    """Completions and rewards fixed by the prompt. Sampling is the one thing that may differ
    between 1 and 2 processes (each process draws from its own random stream), so with it
    fixed the two runs must take the same steps."""
    rows = []
    for ex, p in zip(examples, prompt_ids):
        for g in range(group):
            c = [(sum(p) * 7 + 13 * g + 5 * j) % 200 + 20 for j in range(3 + (sum(p) + g) % 5)]
            reward = float((sum(p) + 3 * g) % 4 == 0) + 0.1 * g
            rows.append({"prompt": p, "completion": c, "text": tok.decode(c), "truncated": (sum(p) + g) % 3 == 0,
                         "reward": reward, "parts": {"format": reward, "accuracy": float(g == 0)}, "example": ex,
                         "sampler_logp": [-0.1 * (x % 7) - 2.0 for x in c]})  # fixed too: the sampler's own
            if entropy:
                rows[-1]["entropy"] = [((x * 31 + j) % 97) / 40 for j, x in enumerate(c)]
    return rows


def capture_gradients(path):
    """A clip_grad_norm_ that first saves the gradient it is given (the whole batch's, after
    the sum over processes) to `path`, one tensor a step."""
    real, grads = torch.nn.utils.clip_grad_norm_, []

    def clip(params, *a, **k):
        params = list(params)  # under FSDP each process holds a shard: gathered whole
        grads.append(torch.cat([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).flatten()
                                for p in params]).clone())
        torch.save(grads, path)
        return real(params, *a, **k)

    return clip


def process(rank, world, port, script, argv, grads_path, fixed=True):
    """One of torchrun's processes; with `fixed`, its samples are fixed_rollout's, else sampled and
    scored with the toy reward. A collective that waits over a minute fails the test: processes
    out of step would otherwise wait for each other for torchrun's hours."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init = distributed.init_distributed
    distributed.init_distributed = lambda name, backend=None, timeout_hours=0: init(name, backend, 1 / 60)
    if fixed:
        sampling.rollout = fixed_rollout
    else:
        R.REWARDS["digits"] = digits
    torch.nn.utils.clip_grad_norm_ = capture_gradients(f"{grads_path}.{rank}")
    {"grpo": grpo, "ppo": ppo, "sft": sft}[script].main(argv)


def one_and_two(script, argv, tmp_path, monkeypatch, updates_per_step=1):
    """Run `script` in this process and on 2 processes; check the gradients (updates_per_step a
    step: ppo.py's value model's, then its policy's); -> the 1-process history and the 2-process
    run's metrics.jsonl records (written by process 0 alone)."""
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture_gradients(tmp_path / "grads.one"))
    one = {"grpo": grpo, "ppo": ppo, "sft": sft}[script].main(argv(tmp_path / "one"))
    mp.spawn(process, args=(2, free_port(), script, argv(tmp_path / "two"), str(tmp_path / "grads.two")), nprocs=2)
    same_gradients(tmp_path, len(one) * updates_per_step)
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in two[1:]] == [r["step"] for r in one]  # one header, each step once
    return one, two


def same_gradients(tmp_path, steps, one="grads.one", two="grads.two"):
    """The gradient of every step, after the sum over processes, is the same in both processes;
    at step 1 (the same weights) it is the 1-process one up to float32 rounding, which is sums
    of the same terms in another order: about 5e-8 against entries up to 0.15 here, so 1e-5 of
    the largest entry is a wide margin that a missing or doubled share of the batch (10% or
    more) does not fit in. Later steps start from weights that Adam's rounding already moved
    apart (see the weights below), so they get 1e-3."""
    g1, g2a, g2b = (torch.load(tmp_path / name) for name in [one, f"{two}.0", f"{two}.1"])
    assert len(g1) == len(g2a) == steps
    for step, (a, b, c) in enumerate(zip(g1, g2a, g2b), 1):
        assert torch.equal(b, c)
        assert (a - b).abs().max() <= (1e-5 if step == 1 else 1e-3) * a.abs().max() and a.abs().max() > 1e-3


def same_weights(one, two, tiny_dir):
    """Adam moves a weight by up to lr a step whatever the gradient's scale (g / (|g| + 1e-8)),
    so where a gradient is ~1e-10 its rounding is magnified: a few weights in 100,000 differ by
    up to 3e-5 in these runs. A different gradient would move weights by about a step, 1e-3:
    the tolerance is a tenth of that."""
    x, y = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    base = load_file(os.path.join(tiny_dir, "model.safetensors"))
    for k in x:
        assert torch.allclose(x[k], y[k], rtol=0, atol=1e-4), k
    assert any(not torch.equal(x[k], base[k]) for k in x)  # and they did train


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(d / "train.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"What is {i} + {2 * i}?", "answer": str(3 * i)}) + "\n")
    return d


@pytest.mark.slow
# --mask-truncated drops a different number of completions in each process: the shares must
# be weighted by the step's count over all processes, not each process's own
# --scale batch and --top-entropy take the std and the entropy threshold over every process's samples
@pytest.mark.parametrize("agg, extra", [("seq-mean", []), ("token-mean", []), ("seq-mean", ["--mask-truncated"]),
                                        ("seq-mean", ["--scale", "batch", "--top-entropy", "0.3"])])
def test_grpo_on_two_processes_takes_the_steps_of_one(tiny_dir, data, tmp_path, monkeypatch, agg, extra):
    def argv(out):
        return ["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(out), "--device", "cpu",
                "--prompts-per-step", "4", "--group", "4", "--micro-batch-size", "8", "--rewards", "format",
                "--num-steps", "3", "--lr", "1e-3", "--beta", "0.04", "--agg", agg, "--sample-every", "1",
                "--max-new-tokens", "8", *extra]

    monkeypatch.setattr(sampling, "rollout", fixed_rollout)
    one, two = one_and_two("grpo", argv, tmp_path, monkeypatch)
    assert len(one) == 3
    for a, b in zip(one, two[1:]):
        # the same samples in the same order: their means are equal to the last bit
        for k in ["reward", "format", "accuracy", "len", "trunc", "zero_var"]:
            assert a[k] == b[k], k
        # sums over micro-batches and processes, in another order: float32 rounding only
        for k in ["kl", "clip", "ratio", "entropy", "gnorm"]:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    assert a["kl"] > 0  # the policy moved away from the reference
    same_weights(tmp_path / "one" / "step-000003", tmp_path / "two" / "step-000003", tiny_dir)
    assert len([l for l in open(tmp_path / "two" / "samples.jsonl")]) == 3 * 4  # one group a step, once


@pytest.mark.slow
def test_ppo_on_two_processes_takes_the_steps_of_one(tiny_dir, data, tmp_path, monkeypatch):
    """The advantages are whitened over every process's tokens, and the losses weighted by the
    step's token count over all of them: per-process means would change the gradients."""
    def argv(out):
        return ["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(out), "--device", "cpu",
                "--prompts-per-step", "8", "--micro-batch-size", "3", "--rewards", "format", "--num-steps", "2",
                "--lr", "1e-3", "--critic-lr", "1e-3", "--beta", "0.04", "--sample-every", "0", "--max-new-tokens", "8"]

    monkeypatch.setattr(sampling, "rollout", fixed_rollout)
    one, two = one_and_two("ppo", argv, tmp_path, monkeypatch, updates_per_step=2)
    for a, b in zip(one, two[1:]):
        for k in ["reward", "format", "len", "trunc"]:
            assert a[k] == b[k], k
        for k in ["kl", "clip", "ratio", "entropy", "gnorm", "vgnorm", "vloss", "value", "ev"]:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    assert a["kl"] != 0 and a["vloss"] > 0  # k1 on fixed (not sampled) tokens: either sign
    same_weights(tmp_path / "one" / "step-000002", tmp_path / "two" / "step-000002", tiny_dir)


def signalled_process(rank, world, port, argv, out):
    """One of 2 grpo.py processes with fixed samples, where process 1 alone gets a SIGINT in step 2
    (a scheduler may signal one of them); its exit code goes to out.code.<rank>."""
    real = common.optimizer_step

    def step_end(model, opt, max_norm, step):
        if step == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, opt, max_norm, step)

    common.optimizer_step = step_end
    try:
        process(rank, world, port, "grpo", argv, f"{out}.grads")
    except SystemExit as e:
        open(f"{out}.code.{rank}", "w").write(str(e.code))


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tiny_dir, data, tmp_path):
    argv = ["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(tmp_path / "run"), "--device",
            "cpu", "--prompts-per-step", "4", "--group", "4", "--rewards", "format", "--num-steps", "5",
            "--lr", "1e-3", "--max-new-tokens", "8", "--save-every", "4"]
    mp.spawn(signalled_process, args=(2, free_port(), argv, str(tmp_path / "run")), nprocs=2)
    assert [open(tmp_path / f"run.code.{rank}").read() for rank in (0, 1)] == ["130", "130"]
    assert sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("step-")) == ["step-000002"]
    assert [json.loads(line).get("step") for line in open(tmp_path / "run" / "metrics.jsonl")] == [None, 1, 2]
    state = torch.load(tmp_path / "run" / "step-000002" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and len(state["rng"]) == 2  # both processes' random streams, for --resume


@pytest.mark.slow
def test_sft_on_two_processes_takes_the_steps_of_one(tiny_dir, data, tmp_path, monkeypatch):
    with open(tmp_path / "sft.jsonl", "w") as f:  # completions of different lengths: uneven shares
        for i in range(10):
            f.write(json.dumps({"prompt": f"What is {i} + {2 * i}?", "completion": f"{i} + {2 * i} = {3 * i}" + "!" * i})
                    + "\n")

    def argv(out):  # batches of 5: processes take 3 and 2 examples, in micro-batches of 2
        return ["--model", tiny_dir, "--data", str(tmp_path / "sft.jsonl"), "--out", str(out), "--device", "cpu",
                "--template", "raw", "--batch-size", "5", "--micro-batch-size", "2", "--num-steps", "3",
                "--lr", "1e-3", "--val-fraction", "0"]

    one, two = one_and_two("sft", argv, tmp_path, monkeypatch)
    assert len(one) == 3
    for a, b in zip(one, two[1:]):
        assert a["tokens"] == b["tokens"] and a["epoch"] == b["epoch"]
        for k in ["loss", "ce", "gnorm"]:
            assert b[k] == pytest.approx(a[k], rel=1e-5), k
    same_weights(tmp_path / "one" / "step-000003", tmp_path / "two" / "step-000003", tiny_dir)


@pytest.mark.slow
def test_grpo_under_fsdp_takes_the_steps_of_data_parallel_and_resumes_exactly(tiny_dir, data, tmp_path):
    """FSDP shards the weights, gradients, AdamW state and reference; the steps must be those of
    the plain data-parallel run, whose processes each hold everything. --ref-reset-every moves
    the sharded reference; an evaluation runs in every process (FSDP's gathers need them all)."""
    def argv(out, *extra):
        return ["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(out), "--device", "cpu",
                "--prompts-per-step", "4", "--group", "4", "--micro-batch-size", "4", "--rewards", "format",
                "--num-steps", "4", "--lr", "1e-3", "--beta", "0.04", "--ref-reset-every", "2", "--save-every", "2",
                "--max-new-tokens", "8", "--eval-data", str(data / "train.jsonl"), "--eval-every", "2",
                "--eval-prompts", "2", *extra]

    def two(out, *extra, grads):
        mp.spawn(process, args=(2, free_port(), "grpo", argv(tmp_path / out, *extra), str(tmp_path / grads)), nprocs=2)
        return [json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")][1:]

    ddp, fsdp = two("ddp", grads="grads.ddp"), two("fsdp", "--fsdp", grads="grads.fsdp")
    same_gradients(tmp_path, 4, "grads.ddp.0", "grads.fsdp")  # step 1 within 1e-5, the later ones 1e-3
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp] and len(ddp) == 4 + 3  # 4 steps, 3 evals
    for a, b in zip(ddp, fsdp):
        for k in a:
            if k not in {"s", "sample_s", "score_s", "ref_s", "update_s", "tok/s"}:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    same_weights(tmp_path / "ddp" / "step-000004", tmp_path / "fsdp" / "step-000004", tiny_dir)

    # sampled and evaluated for real: the sharded policy samples what the whole one does
    def sampled(out, *extra):
        argv = ["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(tmp_path / out),
                "--device", "cpu", "--prompts-per-step", "4", "--group", "4", "--rewards", "digits", "--num-steps", "3",
                "--lr", "1e-2", "--max-new-tokens", "8", "--eval-data", str(data / "train.jsonl"), "--eval-every", "2",
                "--eval-prompts", "2", "--temperature", "0.9", *extra]
        mp.spawn(process, args=(2, free_port(), "grpo", argv, str(tmp_path / f"grads.{out}"), False), nprocs=2)
        return [json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")][1:]

    ddp, fsdp = sampled("ddp-sampled"), sampled("fsdp-sampled", "--fsdp")
    assert len(fsdp) == 3 + 3 and [r.get("eval_pass@1") is None for r in fsdp] == [r.get("eval_pass@1") is None for r in ddp]
    for a, b in zip(ddp, fsdp):
        for k in ["reward", "len", "eval_len", "eval_format"]:
            assert a.get(k) == b.get(k), k  # the same samples
    assert max(r.get("reward", 0) for r in ddp) > 0  # with rewards to learn from
    same_weights(tmp_path / "ddp-sampled" / "step-000003", tmp_path / "fsdp-sampled" / "step-000003", tiny_dir)

    # resumed after step 2, from the gathered weights, optimizer state and reference
    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "step-000004")
    two("resumed", "--fsdp", "--resume", grads="grads.resumed")
    a = load_file(tmp_path / "fsdp" / "step-000004" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "step-000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def sharded_sampling(rank, world, port, out):
    """Process `rank` of 2 samples from an FSDP-sharded tiny model; process 0's completions all
    end at their first token, process 1's never do."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    model, tok = models.load_model(out["model"])
    distributed.shard(model, torch.device("cpu"))
    eos = list(range(len(tok))) if rank == 0 else []
    got = sampling.sample(model, [[5, 6, 7], [8, 9]], 2, 6, eos, tok.pad_token_id,
                          generator=torch.Generator().manual_seed(rank))
    # again, process 1's completions now all ending by their third token: both stop there
    early = list(range(len(tok))) if rank == 0 else sorted(set(got["ids"][:, 2].tolist()))
    passes = []
    model.register_forward_hook(lambda *a: passes.append(1))
    again = sampling.sample(model, [[5, 6, 7], [8, 9]], 2, 6, early, tok.pad_token_id,
                            generator=torch.Generator().manual_seed(rank))
    torch.save({**got, "again": again, "passes": len(passes)}, f"{out['path']}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    # all is saved: leave without the interpreter's finalization, where gloo's threads of the
    # sharded model's collectives are known to abort now and then ("terminate called without
    # an active exception") after the work is done
    os._exit(0)


@pytest.mark.slow
def test_sharded_sampling_keeps_every_process_in_step(tiny_dir, tmp_path):
    # a process whose completions are all done must still take part in the others' forward
    # passes (each gathers every layer's shards from both); were it to stop, the other would
    # wait for it until the 60-second timeout
    mp.spawn(sharded_sampling, args=(2, free_port(), {"model": tiny_dir, "path": str(tmp_path / "s")}), nprocs=2)
    first, second = torch.load(tmp_path / "s.0"), torch.load(tmp_path / "s.1")
    assert first["mask"].sum(1).tolist() == [1] * 4 and not first["truncated"].any()
    assert second["mask"].sum(1).tolist() == [6] * 4 and second["truncated"].all()
    model, tok = models.load_model(tiny_dir)  # and the sharded model samples what the whole one does
    whole = sampling.sample(model, [[5, 6, 7], [8, 9]], 2, 6, [], tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    assert torch.equal(whole["ids"], second["ids"])
    last = int(second["again"]["mask"].sum(1).max()) - 1  # the step process 1's last completion ended on
    assert not second["again"]["truncated"].any() and last <= 2
    assert first["passes"] == second["passes"] == 1 + last  # the prompts' pass, then one a token until all end


@pytest.mark.slow
def test_sft_under_fsdp_takes_the_steps_of_data_parallel(tiny_dir, tmp_path):
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"prompt": f"What is {i} + {2 * i}?", "completion": f"{i} + {2 * i} = {3 * i}" + "!" * i})
                    + "\n")

    def argv(out, *extra):  # batches of 5: 3 and 2 examples, so 2 and 1 micro-batches of 2 (one passes over nothing)
        return ["--model", tiny_dir, "--data", str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / out),
                "--device", "cpu", "--template", "raw", "--batch-size", "5", "--micro-batch-size", "2",
                "--num-steps", "3", "--lr", "1e-3", "--val-fraction", "0.2", "--eval-every", "2", *extra]

    for out, extra in [("ddp", []), ("fsdp", ["--fsdp", "--grad-checkpointing"])]:  # recomputed: the same numbers
        mp.spawn(process, args=(2, free_port(), "sft", argv(out, *extra), str(tmp_path / f"grads.{out}")), nprocs=2)
    same_gradients(tmp_path, 3, "grads.ddp.0", "grads.fsdp")
    ddp, fsdp = ([json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")][1:] for out in ["ddp", "fsdp"])
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp] and sum("val_loss" in r for r in fsdp) == 3
    for a, b in zip(ddp, fsdp):
        for k in a:
            if k not in {"s", "tok/s"}:
                assert b[k] == pytest.approx(a[k], rel=1e-5), k
    same_weights(tmp_path / "ddp" / "step-000003", tmp_path / "fsdp" / "step-000003", tiny_dir)
