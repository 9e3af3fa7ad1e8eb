"""LoRA (--lora-rank): only the adapters train, the reference is the base with the adapters
off (never a second model) and stays the initial model however far the adapters move, and
the checkpoint is a plain merged model with the adapters beside it."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import grpo
import sft
from nanor1 import models

peft = pytest.importorskip("peft")  # optional; CI installs it (.ci/run)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(d / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"What is {i} + {2 * i}?", "answer": str(3 * i)}) + "\n")
    return d


def lora_run(tiny_dir, data, out, *extra):
    return grpo.main(["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(out), "--device", "cpu",
                      "--prompts-per-step", "2", "--group", "4", "--max-new-tokens", "8", "--rewards", "digits",
                      "--lr", "5e-2", "--beta", "0.1", "--lora-rank", "4", "--lora-alpha", "8", "--num-steps", "4",
                      *extra])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_trains_the_adapters_against_the_unchanged_base(tiny_dir, data, tmp_path, toy, monkeypatch):
    # every reference pass of the run (the ones under inference mode) is recorded, to be redone
    # below on a freshly loaded base model
    real, ref_calls = grpo.completion_logprobs, []

    def recording(model, *inputs, **kw):
        out = real(model, *inputs, **kw)
        if torch.is_inference_mode_enabled():
            ref_calls.append(([t.clone() if torch.is_tensor(t) else t for t in inputs], out.clone()))
        return out

    monkeypatch.setattr(grpo, "completion_logprobs", recording)
    history = lora_run(tiny_dir, data, tmp_path / "run")
    assert len(ref_calls) == 4  # one micro-batch a step

    base, _ = models.load_model(tiny_dir)
    with torch.no_grad():  # the reference the loop used is the initial model, bit for bit, at every step
        assert all(torch.equal(got, real(base, *inputs)) for inputs, got in ref_calls)
    assert history[0]["kl"] == 0 and history[-1]["kl"] > 1e-4  # the policy moved away from it

    ckpt = tmp_path / "run" / "step-000004"
    trained = peft.PeftModel.from_pretrained(models.load_model(tiny_dir)[0], str(ckpt / "adapter"))
    saved = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # adapters only
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0: it trained
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    # the merged checkpoint is a plain model that computes what the base with the adapters on does
    merged, _ = models.load_model(str(ckpt))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert torch.allclose(logits(merged, ids), logits(trained, ids), atol=1e-5)
    assert not torch.allclose(logits(merged, ids), logits(base, ids), atol=1e-3)
    with trained.disable_adapter():  # and the base under the adapters is the initial model
        assert torch.equal(logits(trained, ids), logits(base, ids))


def test_lora_with_grad_checkpointing_takes_the_same_steps(tiny_dir, data, tmp_path, toy):
    # with a frozen base, recomputation must still reach the adapters' gradients
    a = lora_run(tiny_dir, data, tmp_path / "plain", "--num-steps", "2")
    b = lora_run(tiny_dir, data, tmp_path / "ckpt", "--num-steps", "2", "--grad-checkpointing")
    assert a[-1]["gnorm"] > 0 and b[-1]["gnorm"] == pytest.approx(a[-1]["gnorm"], rel=1e-5)
    x = load_file(tmp_path / "plain" / "step-000002" / "adapter" / "adapter_model.safetensors")
    y = load_file(tmp_path / "ckpt" / "step-000002" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


def test_lora_flags_and_a_missing_peft_fail_clearly(tiny_dir, data, tmp_path, toy, monkeypatch):
    with pytest.raises(SystemExit):  # argparse: the reference is the base, which never moves
        lora_run(tiny_dir, data, tmp_path / "a", "--ref-reset-every", "2")
    lora_run(tiny_dir, data, tmp_path / "b", "--num-steps", "1")
    with pytest.raises(SystemExit) as e:  # a full-weight run cannot go on from a LoRA checkpoint
        grpo.main(["--model", tiny_dir, "--data", str(data / "train.jsonl"), "--out", str(tmp_path / "b"),
                   "--device", "cpu", "--num-steps", "2", "--max-new-tokens", "8", "--resume"])
    assert "written with --lora-rank" in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # nor LoRA run with other adapters
        lora_run(tiny_dir, data, tmp_path / "b", "--num-steps", "2", "--lora-rank", "8", "--resume")
    assert "have rank 4 and alpha 8, not --lora-rank 8 --lora-alpha 8" in str(e.value.code)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        lora_run(tiny_dir, data, tmp_path / "c")
    assert str(e.value.code) == "error: --lora-rank: peft is not installed (pip install peft)"


def test_sft_with_lora_learns_its_examples_and_leaves_the_base_alone(tiny_dir, tmp_path):
    with open(tmp_path / "four.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} = {2 * i}."}) + "\n")
    history = sft.main(["--model", tiny_dir, "--data", str(tmp_path / "four.jsonl"), "--out", str(tmp_path / "run"),
                        "--device", "cpu", "--template", "raw", "--batch-size", "4", "--micro-batch-size", "4",
                        "--num-steps", "15", "--lr", "1e-2", "--val-fraction", "0", "--lora-rank", "8",
                        "--lora-alpha", "16"])
    # the adapters alone carry the learning: slower than training every weight (6.0 to 1.8 in these
    # steps), for the random embeddings stay as they are, but 6.0 to 5.2
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    trained = peft.PeftModel.from_pretrained(models.load_model(tiny_dir)[0], str(tmp_path / "run" / "step-000015" / "adapter"))
    base, _ = models.load_model(tiny_dir)
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with trained.disable_adapter():
        assert torch.equal(logits(trained, ids), logits(base, ids))
    merged, _ = models.load_model(str(tmp_path / "run" / "step-000015"))
    assert torch.allclose(logits(merged, ids), logits(trained, ids), atol=1e-5)
