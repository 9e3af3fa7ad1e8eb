"""Runs that survive, for grpo.py and sft.py: a checkpoint is written atomically; a run
stopped after a checkpoint and resumed trains exactly as one that was never stopped
(bitwise on CPU: one thread, conftest.py); a step with a non-finite loss is skipped, and
too many in a row stop the run."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import grpo
import sft
from nanor1 import checkpoints, common, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"s", "sample_s", "score_s", "ref_s", "update_s", "tok/s"}  # wall-clock fields, the only ones allowed to differ


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(d / "train.jsonl", "w") as f:
        for i in range(10):  # 10 prompts, 4 per step: steps 3 and 6 cross an epoch of the data order
            a, b = (7 * i) % 23, (5 * i) % 19
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b),
                                "completion": f"{a} + {b} = {a + b}."}) + "\n")
    return d


def grpo_run(tiny_dir, data, out, *extra, evaluate=True):
    # beta > 0 with the reference reset at steps 3 and 5 (so the one resumed after step 3 is not
    # the initial model), sampling at temperature 0.9, an evaluation after every step (its own
    # random stream): every piece of state counts
    ev = ["--eval-data", str(data / "train.jsonl"), "--eval-every", "1", "--eval-prompts", "2", "--eval-samples", "2"]
    return grpo.main(["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(out), "--device", "cpu",
                      "--prompts-per-step", "4", "--group", "4", "--max-new-tokens", "8", "--lr", "1e-2",
                      "--rewards", "digits", "--temperature", "0.9", "--beta", "0.04", "--ref-reset-every", "2",
                      "--num-steps", "6", "--save-every", "3", "--sample-every", "1", "--warmup-steps", "3",
                      *(ev if evaluate else []), *extra])


def sft_run(tiny_dir, data, out, *extra, evaluate=True):
    # batches of 4 of 9 examples (one held out): steps 4 onwards are in a new epoch's order
    ev = ["--val-fraction", "0.1", "--eval-data", str(data / "train.jsonl"), "--eval-every", "3", "--eval-prompts", "2",
          "--eval-samples", "2", "--max-new-tokens", "6"]
    return sft.main(["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(out), "--device", "cpu",
                     "--template", "raw", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2",
                     "--num-steps", "6", "--save-every", "3", *(ev if evaluate else ["--val-fraction", "0"]), *extra])


def steps_logged(out):
    """metrics.jsonl's step and eval records, wall-clock fields left out."""
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if "step" in r]


def stop_after(full, out, step):
    """The state a run killed right after saving checkpoint `step` leaves behind: that
    checkpoint, and the logs of every step it got to (the next ones too)."""
    shutil.copytree(full, out)
    for d in os.listdir(out):
        if d.startswith("step-") and int(d[5:]) > step:
            shutil.rmtree(out / d)


# grpo three times: with the reference moved by --ref-reset-every (restored from the
# checkpoint), without (the reference is --model again), and with LoRA (the adapters come from
# the checkpoint, the base from --model); sft.py with and without LoRA
@pytest.mark.parametrize("script, extra", [
    ("grpo", []), ("grpo", ["--ref-reset-every", "0"]), ("sft", []),
    *[pytest.param(script, extra, marks=pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                                           reason="peft is optional"))
      for script, extra in [("grpo", ["--ref-reset-every", "0", "--lora-rank", "4"]), ("sft", ["--lora-rank", "4"])]]])
def test_resumed_run_equals_the_uninterrupted_one(tiny_dir, data, tmp_path, toy, script, extra):
    run = lambda *a, **k: (grpo_run if script == "grpo" else sft_run)(*a, *extra, **k)  # noqa: E731
    last, half = "step-000006", 3
    run(tiny_dir, data, tmp_path / "full")
    stop_after(tmp_path / "full", tmp_path / "resumed", half)
    history = run(tiny_dir, data, tmp_path / "resumed", "--resume")
    assert [r["step"] for r in history] == list(range(half + 1, 2 * half + 1))
    a = load_file(tmp_path / "full" / last / "model.safetensors")
    b = load_file(tmp_path / "resumed" / last / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, resumed = steps_logged(tmp_path / "full"), steps_logged(tmp_path / "resumed")
    assert full == resumed and len(full) > 2 * half  # steps and evals, each once, equal to the last digit
    before = load_file(tmp_path / "full" / f"step-{half:06d}" / "model.safetensors")
    assert any(not torch.equal(a[k], before[k]) for k in a)  # the second half trained
    if "--lora-rank" in extra:
        a, b = (load_file(tmp_path / run / last / "adapter" / "adapter_model.safetensors") for run in ["full", "resumed"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if script == "grpo":
        samples = [json.loads(line) for line in open(tmp_path / "resumed" / "samples.jsonl")]
        assert [s["step"] for s in samples] == [s["step"] for s in map(json.loads, open(tmp_path / "full" / "samples.jsonl"))]


def test_resume_from_a_named_checkpoint_and_not_without_one(tiny_dir, data, tmp_path, toy):
    grpo_run(tiny_dir, data, tmp_path / "full")
    history = grpo_run(tiny_dir, data, tmp_path / "other", "--resume", str(tmp_path / "full" / "step-000003"))
    a = load_file(tmp_path / "full" / "step-000006" / "model.safetensors")
    b = load_file(tmp_path / "other" / "step-000006" / "model.safetensors")
    assert [r["step"] for r in history] == [4, 5, 6] and all(torch.equal(a[k], b[k]) for k in a)
    for script, argv in [(grpo_run, ["--resume"]), (sft_run, ["--resume", str(tmp_path / "nowhere")])]:
        with pytest.raises(SystemExit) as e:
            script(tiny_dir, data, tmp_path / "empty", *argv)
        assert str(e.value.code).startswith("error: --resume")


def test_resume_refuses_to_mix_histories_warns_of_changed_flags_and_drops_a_half_line(tiny_dir, data, tmp_path,
                                                                                       toy, capsys):
    grpo_run(tiny_dir, data, tmp_path / "full", "--save-every", "1", evaluate=False)
    with pytest.raises(SystemExit) as e:  # step-000004..6 of --out went on from step 3 already
        grpo_run(tiny_dir, data, tmp_path / "full", "--resume", str(tmp_path / "full" / "step-000003"), evaluate=False)
    assert str(e.value.code).startswith("error: --resume") and "step-000004, step-000005, step-000006" in str(e.value.code)
    stop_after(tmp_path / "full", tmp_path / "cut", 3)
    with open(tmp_path / "cut" / "samples.jsonl", "a") as f:
        f.write('{"step": 7, "prompt": "What is')  # a kill -9 in the middle of a line
    capsys.readouterr()
    grpo_run(tiny_dir, data, tmp_path / "cut", "--resume", "--seed", "5", evaluate=False)
    assert "warning: resuming with changed flags (--seed 0 -> 5)" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in open(tmp_path / "cut" / "samples.jsonl")][-1] == 6


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tiny_dir, data, tmp_path, toy, monkeypatch):
    real_save = torch.save

    def crash(obj, path, *a, **k):  # dies with the model written and the state half-written
        if "step-000006" in str(path):
            open(path, "wb").write(b"half")
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(SystemExit) as e:  # main() turns the interrupt into one line and exit code 130
        grpo_run(tiny_dir, data, tmp_path / "run")
    assert e.value.code == 130
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path / "run")) == [".tmp-step-000006", "args.json", "metrics.jsonl",
                                                    "samples.jsonl", "step-000003"]
    path, state = checkpoints.resume_from(str(tmp_path / "run"), "latest", {}, [])
    assert path.endswith("step-000003") and state["step"] == 3
    grpo_run(tiny_dir, data, tmp_path / "run", "--resume")  # and the run completes from there
    assert (tmp_path / "run" / "step-000006" / checkpoints.STATE_FILE).exists()


def test_save_total_limit_keeps_the_newest(tiny_dir, data, tmp_path, toy):
    grpo_run(tiny_dir, data, tmp_path / "run", "--save-every", "1", "--save-total-limit", "2")
    assert sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("step")) == ["step-000005", "step-000006"]
    sft_run(tiny_dir, data, tmp_path / "sft", "--save-every", "1", "--save-total-limit", "1")
    assert sorted(d for d in os.listdir(tmp_path / "sft") if d.startswith("step")) == ["step-000006"]


def test_a_new_run_into_a_used_out_is_refused_and_changes_nothing(tiny_dir, data, tmp_path, toy):
    """The usual mistake after a crash, the same command again without --resume: refused before
    anything is written, every file left byte for byte; --overwrite removes the run's files
    (not the user's own) and starts over; --resume goes on (tested above)."""
    out = tmp_path / "run"
    sft_run(tiny_dir, data, out, evaluate=False)
    (out / "notes.txt").write_text("mine")
    files = lambda: {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    for script in (grpo_run, sft_run):
        with pytest.raises(SystemExit) as e:
            script(tiny_dir, data, out, evaluate=False)
        assert str(e.value.code).startswith(f"error: --out {out} holds a run (args.json, metrics.jsonl, step-000003, "
                                            "step-000006)") and "--resume" in e.value.code and "--overwrite" in e.value.code
    with pytest.raises(SystemExit):  # --overwrite with a typo in a flag: nothing removed before the run can start
        grpo_run(tiny_dir, data, out, "--overwrite", "--eval-data", str(tmp_path / "nope.jsonl"))
    assert files() == before
    grpo_run(tiny_dir, data, out, "--overwrite", "--num-steps", "2", evaluate=False)
    assert sorted(os.listdir(out)) == ["args.json", "metrics.jsonl", "notes.txt", "samples.jsonl", "step-000002"]
    assert [json.loads(line).get("step") for line in open(out / "metrics.jsonl")] == [None, 1, 2]  # one run's log
    assert json.load(open(out / "args.json"))["num_steps"] == 2


@pytest.mark.parametrize("script", ["grpo", "sft"])
def test_ctrl_c_stops_at_the_end_of_the_step_with_a_checkpoint_and_resumes_exactly(tiny_dir, data, tmp_path, toy,
                                                                                   monkeypatch, capfd, script):
    """SIGINT during step 2 (not on the --save-every 3 cadence): the step ends, step-000002 is
    written, one line says how to go on, the exit code is 130; the same command plus --resume
    then trains exactly as the run that was never stopped (bitwise)."""
    run = grpo_run if script == "grpo" else sft_run
    run(tiny_dir, data, tmp_path / "full")
    real_step = common.optimizer_step

    def interrupted(model, opt, max_norm, step):  # the signal arrives in the middle of step 2
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(model, opt, max_norm, step)

    monkeypatch.setattr(common, "optimizer_step", interrupted)
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tiny_dir, data, tmp_path / "stopped")
    assert e.value.code == 130 and signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back
    out, err = capfd.readouterr()
    assert "SIGINT: stopping at the end of this step" in err
    assert out.strip().splitlines()[-1] == (f"stopped after step 2; its checkpoint is "
                                            f"{tmp_path / 'stopped' / 'step-000002'}: go on with the same command "
                                            "plus --resume")
    assert sorted(d for d in os.listdir(tmp_path / "stopped") if d.startswith("step-")) == ["step-000002"]
    monkeypatch.setattr(common, "optimizer_step", real_step)
    history = run(tiny_dir, data, tmp_path / "stopped", "--resume")
    assert [r["step"] for r in history] == [3, 4, 5, 6]
    a = load_file(tmp_path / "full" / "step-000006" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "step-000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert steps_logged(tmp_path / "full") == steps_logged(tmp_path / "stopped")
    with pytest.raises(SystemExit) as e:  # finished: nothing to go on with, and nothing written
        run(tiny_dir, data, tmp_path / "stopped", "--resume")
    assert "the run finished at step 6 of 6; raise --num-steps to go on" in str(e.value.code)
    assert steps_logged(tmp_path / "full") == steps_logged(tmp_path / "stopped")


def test_ctrl_c_in_the_last_step_finishes_and_before_the_first_stops_at_once(tiny_dir, data, tmp_path, toy,
                                                                            monkeypatch, capsys):
    real_step, real_load = common.optimizer_step, models.load_for_training

    def interrupted(model, opt, max_norm, step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(model, opt, max_norm, step)

    monkeypatch.setattr(common, "optimizer_step", interrupted)
    assert len(grpo_run(tiny_dir, data, tmp_path / "last", evaluate=False)) == 6  # the run was done: exit 0
    assert "stopped after" not in capsys.readouterr().out

    def loading(*a, **k):  # Ctrl-C while the model loads: nothing to save, so at once
        os.kill(os.getpid(), signal.SIGINT)
        return real_load(*a, **k)

    monkeypatch.setattr(models, "load_for_training", loading)
    with pytest.raises(SystemExit) as e:
        grpo_run(tiny_dir, data, tmp_path / "early", evaluate=False)
    assert e.value.code == 130 and capsys.readouterr().err == common.INTERRUPTED + "\n"
    assert not (tmp_path / "early").exists()
    (tmp_path / "early").mkdir()  # a run that left its logs and no checkpoint: --overwrite is the way on
    (tmp_path / "early" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds the logs of a run with no checkpoint .*; add --overwrite"):
        grpo_run(tiny_dir, data, tmp_path / "early", evaluate=False)


def test_save_optimizer_0_writes_the_weights_alone(tiny_dir, data, tmp_path, capsys):
    sft_run(tiny_dir, data, tmp_path / "run", "--save-optimizer", "0", evaluate=False)
    for step in ["step-000003", "step-000006"]:
        assert (tmp_path / "run" / step / "model.safetensors").exists()
        assert not (tmp_path / "run" / step / checkpoints.STATE_FILE).exists()
    assert f"saved {tmp_path / 'run' / 'step-000006'} (weights only: --save-optimizer 0)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sft_run(tiny_dir, data, tmp_path / "run", "--resume", evaluate=False)
    assert "holds no checkpoint with a trainer_state.pt" in str(e.value.code)


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_dir, data, tmp_path):
    """A real kill -9 of sft.py at a random moment after its first checkpoint: every
    checkpoint left is complete, and resuming gives the uninterrupted run's weights."""
    argv = [sys.executable, os.path.join(ROOT, "sft.py"), "--model", tiny_dir, "--data", str(data / "train.jsonl"),
            "--device", "cpu", "--template", "raw", "--batch-size", "4", "--lr", "1e-2", "--num-steps", "40",
            "--save-every", "1", "--val-fraction", "0", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(argv + ["--out", str(tmp_path / "full")], check=True, capture_output=True, env=env)
    proc = subprocess.Popen(argv + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    while not (tmp_path / "killed" / "step-000005").exists() and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(d for d in os.listdir(tmp_path / "killed") if d.startswith("step-"))
    assert "step-000040" not in left  # it was killed before the end
    for d in left:  # each one loads, state included
        models.load_model(str(tmp_path / "killed" / d))
        checkpoints.resume_from(str(tmp_path / "elsewhere"), str(tmp_path / "killed" / d), {}, [])
    subprocess.run(argv + ["--out", str(tmp_path / "killed"), "--resume"], check=True, capture_output=True, env=env)
    a = load_file(tmp_path / "full" / "step-000040" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "step-000040" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- atomic checkpoints

def test_checkpoint_is_atomic_and_loads_back(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    path = tmp_path / "step-000001"
    checkpoints.save_checkpoint(path, model, tok, {"lr": 0.1})
    assert json.loads((path / "args.json").read_text()) == {"lr": 0.1}
    assert AutoModelForCausalLM.from_pretrained(path) is not None

    # a crash in the middle of writing the next one leaves the previous one intact
    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(type(tok), "save_pretrained", crash)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(path, model, tok, {"lr": 0.2})
    assert json.loads((path / "args.json").read_text()) == {"lr": 0.1}
    reloaded, _ = models.load_model(str(path))
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    monkeypatch.undo()
    checkpoints.save_checkpoint(path, model, tok, {"lr": 0.3})  # overwriting works and cleans up
    assert json.loads((path / "args.json").read_text()) == {"lr": 0.3}
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]


# ------------------------------------------------------------------------- non-finite steps

def nan_on(module, name, monkeypatch, bad):
    """Wrap module.name so that the losses it returns are NaN on the calls whose number is in `bad`."""
    real, calls = getattr(module, name), []

    def wrapped(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        return (out[0] * float("nan"), *out[1:]) if len(calls) in bad else out

    monkeypatch.setattr(module, name, wrapped)


def test_a_non_finite_step_is_skipped_and_too_many_stop_the_run(tiny_dir, data, tmp_path, toy, monkeypatch, capsys):
    # grpo: 16 samples in micro-batches of 8 are two loss calls a step; step 2 is calls 3 and 4
    nan_on(grpo, "grpo_loss", monkeypatch, {3})
    history = grpo_run(tiny_dir, data, tmp_path / "one", "--save-every", "1", evaluate=False)
    assert [r["gnorm"] is None for r in history] == [False, True, False, False, False, False]
    assert "warning: step 2: gradient norm is nan; update skipped" in capsys.readouterr().err
    a = load_file(tmp_path / "one" / "step-000001" / "model.safetensors")
    b = load_file(tmp_path / "one" / "step-000002" / "model.safetensors")
    c = load_file(tmp_path / "one" / "step-000003" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(b[k], c[k]) for k in a)

    nan_on(grpo, "grpo_loss", monkeypatch, set(range(5, 100)))  # every step from step 3 on
    with pytest.raises(SystemExit) as e:
        grpo_run(tiny_dir, data, tmp_path / "stop", "--max-bad-steps", "2", evaluate=False)
    assert str(e.value.code).startswith("error: --max-bad-steps 2: the last 2 steps had a non-finite")
    assert [r["step"] for r in steps_logged(tmp_path / "stop")] == [1, 2, 3, 4]  # it stopped after step 4

    # sft: one loss call per micro-batch, two a step
    nan_on(sft, "token_losses", monkeypatch, set(range(1, 100)))
    with pytest.raises(SystemExit) as e:
        sft_run(tiny_dir, data, tmp_path / "sft", "--max-bad-steps", "3", evaluate=False)
    assert str(e.value.code).startswith("error: --max-bad-steps 3")
    assert [r["step"] for r in steps_logged(tmp_path / "sft")] == [1, 2, 3]
