"""The shared module: prompt templates and their order, jsonl errors, device and dtype choice,
the learning rate."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from nanor1 import common

# ------------------------------------------------------------------------- prompt formatting

def test_r1_template_has_the_question_once_and_ends_with_assistant(tiny):
    _, tok = tiny
    text = common.format_prompt("What is 2+3?", tok, "r1")
    assert text.endswith("User: What is 2+3? Assistant:")
    assert common.format_prompt("Add 2 and 3", tok, "r1").endswith("User: Add 2 and 3. Assistant:")
    assert common.format_prompt("hi", tok, "raw") == "hi"


def test_chat_template_never_leaves_an_open_think(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    # a template like DeepSeek-R1-Distill's, which opens <think> for the model
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    text = common.format_prompt("2+2?", tok, "chat")
    assert text == "<|user|>2+2?\n<|assistant|>"
    tok.chat_template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert common.format_prompt("2+2?", tok, "chat") == "[2+2?]"
    tok.chat_template = None
    with pytest.raises(common.UserError, match="--template chat"):
        common.format_prompt("2+2?", tok, "chat")


# ------------------------------------------------------------------------- data, device and dtype

def test_read_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b" "answer": "2"}\n')
    with pytest.raises(common.UserError, match=r"d\.jsonl:3: not valid JSON"):
        common.read_jsonl(str(p))
    p.write_text('{"prompt": "a", "answer": "1"}\n{"question": "b"}\n')
    with pytest.raises(common.UserError, match=r"d\.jsonl:2: missing field 'prompt'"):
        common.read_jsonl(str(p))
    p.write_text('{"prompt": ["a"], "answer": "1"}\n')
    with pytest.raises(common.UserError, match=r"d\.jsonl:1: field 'prompt' must be a string, not list"):
        common.read_jsonl(str(p))
    p.write_text('{"prompt": "a", "answer": 72}\n')
    assert common.read_jsonl(str(p), required=("prompt", "answer"))[0]["answer"] == "72"
    p.write_text('[1, 2]\n')
    with pytest.raises(common.UserError, match=r"d\.jsonl:1: expected a JSON object"):
        common.read_jsonl(str(p))
    with pytest.raises(common.UserError, match="no such file"):
        common.read_jsonl(str(tmp_path / "nope.jsonl"))
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(common.UserError, match=r"d\.jsonl:2: not UTF-8"):
        common.read_jsonl(str(p))
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "bom"}\n')  # a byte-order mark is fine
    assert common.read_jsonl(str(p))[0]["prompt"] == "bom"
    p.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": "2"}\n')
    rows = common.read_jsonl(str(p), required=("prompt", "answer"))
    assert [r["prompt"] for r in rows] == ["a", "b"] and rows[1]["_where"].endswith("d.jsonl:3")


def test_device_and_dtype_choice():
    assert common.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert common.pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert common.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="--device cuda"):
            common.pick_device("cuda")
    with pytest.raises(common.UserError, match="--device gpu: not a device"):
        common.pick_device("gpu")


def test_learning_rate_warms_up_then_decays_on_a_cosine():
    lr = [common.lr_at(s, 110, 1.0, 10, 0.1) for s in (1, 5, 10, 60, 110)]
    # warm-up s/10; then 0.1 + 0.9 * (1 + cos(pi * (s - 10) / 100)) / 2
    assert lr == pytest.approx([0.1, 0.5, 1.0, 0.55, 0.1])
    # grpo.py's schedule: min ratio 1 is constant after the warm-up, exactly the peak; no warm-up, the peak at once
    assert [common.lr_at(s, 100, 3e-6, 4, 1.0) for s in (2, 5, 100)] == [1.5e-6, 3e-6, 3e-6]
    assert [common.lr_at(s, 100, 3e-6, 0, 1.0) for s in (1, 100)] == [3e-6, 3e-6]


def test_prompts_are_drawn_in_seeded_epochs_and_a_kept_state_goes_on_from_there():
    state = {"epoch": 0, "pos": 0}
    drawn = common.next_prompts(5, state, 3, seed=7) + common.next_prompts(5, state, 3, seed=7)
    assert sorted(drawn[:5]) == [0, 1, 2, 3, 4]  # every prompt once an epoch, then the next epoch's order
    assert drawn[:5] == np.random.default_rng(7).permutation(5).tolist()
    assert drawn[5] == np.random.default_rng(8).permutation(5)[0] and state == {"epoch": 1, "pos": 1}
    kept = dict(state)  # what a checkpoint holds: the draws after it are the uninterrupted run's
    assert common.next_prompts(5, kept, 4, seed=7) == common.next_prompts(5, state, 4, seed=7)
