"""The shared module: prompt templates, jsonl errors, device and dtype choice."""

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
