"""The shared module: prompt templates and their order, jsonl errors, device and dtype choice,
the learning rate, the completion length a model's context allows, stop signals and errors."""

import json
import os
import signal

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
    # the column is the one on the line, counted by hand: "answer" starts at column 16, where a comma belongs
    with pytest.raises(common.UserError, match=r"Expecting ',' delimiter at column 16\)$"):
        common.read_jsonl(str(p))
    # a line cut off after 43 characters: said so, not "column 1" of the line after it
    p.write_text('{"prompt": "What is 12 + 7?", "answer": "1"\n{"prompt": "b"}\n')
    with pytest.raises(common.UserError, match=r"d\.jsonl:1: .*the line ends at column 43, the JSON unfinished"):
        common.read_jsonl(str(p))
    p.write_text('{"prompt": "What is 12 + 7?", "answer": "1\r\n')
    with pytest.raises(common.UserError, match=r"d\.jsonl:1: not valid JSON \(Unterminated string .* at column 41"):
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


def test_linear_and_cosine_decays_by_hand():
    # 10 steps, 2 of warm-up: progress (s - 2) / 8; linear 1 - p, cosine (1 + cos(pi p)) / 2, both to 0.1
    assert [common.lr_at(s, 10, 1.0, 2, 0.1, "linear") for s in (1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 0.55, 0.1])
    assert [common.lr_at(s, 10, 1.0, 2, 0.1, "cosine") for s in (4, 6, 10)] == pytest.approx(
        [0.1 + 0.9 * (1 + 2 ** -0.5) / 2, 0.55, 0.1])
    assert [common.lr_at(s, 10, 1.0, 2, 0.1, "constant") for s in (1, 3, 10)] == [0.5, 1.0, 1.0]


def test_max_new_tokens_left_out_fits_the_context_and_given_is_checked(tiny, tmp_path, capsys):
    _, tok = tiny
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "a longer prompt " * 3}) + "\n")
    examples, ids = common.load_prompts(str(path), tok, "raw")
    longest = max(len(i) for i in ids)
    # left out: 1024 does not fit a context of 64, so what the longest prompt (line 2) leaves, and said
    assert common.fit_max_new_tokens(None, 64, examples, ids) == 64 - longest
    assert f"--max-new-tokens {64 - longest}: what the model's context of 64 tokens leaves after the longest prompt " \
           f"({path}:2, {longest} tokens), not 1024" in capsys.readouterr().out
    assert common.fit_max_new_tokens(None, 4096, examples, ids) == 1024  # room enough: the default, unsaid
    assert capsys.readouterr().out == ""
    assert common.fit_max_new_tokens(64 - longest, 64, examples, ids) == 64 - longest
    with pytest.raises(common.UserError, match=f"{path}:2: the prompt is {longest} tokens; with --max-new-tokens "
                                               f"{65 - longest} it does not fit"):
        common.fit_max_new_tokens(65 - longest, 64, examples, ids)
    with pytest.raises(common.UserError,
                       match=f"{path}:2: the prompt is {longest} tokens; the model's context of {longest} leaves no room"):
        common.fit_max_new_tokens(None, longest, examples, ids)


def test_a_signal_stops_at_the_step_end_once_armed_and_a_second_one_at_once(capfd):
    before = signal.getsignal(signal.SIGTERM)
    with common.stop_signals() as stop:
        with pytest.raises(KeyboardInterrupt):  # before the first step (loading, say): at once, nothing to save
            os.kill(os.getpid(), signal.SIGINT)
        stop["armed"] = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert "at" in stop and capfd.readouterr().err == ("SIGTERM: stopping at the end of this step, with a "
                                                          "checkpoint (again to stop at once)\n")
        with pytest.raises(KeyboardInterrupt):  # a second one: at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == before and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_user_errors_are_one_line_from_process_0_and_an_interrupt_exits_130(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e, common.user_errors():
        raise common.UserError("data.jsonl:3: missing field 'prompt'")
    assert e.value.code == "error: data.jsonl:3: missing field 'prompt'"
    with pytest.raises(SystemExit) as e, common.user_errors():
        raise KeyboardInterrupt
    assert e.value.code == 130 and capsys.readouterr().err.count("\n") == 1
    monkeypatch.setenv("RANK", "1")  # torchrun's other processes fail alike, and say nothing: one line in all
    for error, code in [(common.UserError("data.jsonl:3: missing field 'prompt'"), 1), (KeyboardInterrupt(), 130)]:
        with pytest.raises(SystemExit) as e, common.user_errors():
            raise error
        assert e.value.code == code and capsys.readouterr() == ("", "")


def test_prompts_are_drawn_in_seeded_epochs_and_a_kept_state_goes_on_from_there():
    state = {"epoch": 0, "pos": 0}
    drawn = common.next_prompts(5, state, 3, seed=7) + common.next_prompts(5, state, 3, seed=7)
    assert sorted(drawn[:5]) == [0, 1, 2, 3, 4]  # every prompt once an epoch, then the next epoch's order
    assert drawn[:5] == np.random.default_rng(7).permutation(5).tolist()
    assert drawn[5] == np.random.default_rng(8).permutation(5)[0] and state == {"epoch": 1, "pos": 1}
    kept = dict(state)  # what a checkpoint holds: the draws after it are the uninterrupted run's
    assert common.next_prompts(5, kept, 4, seed=7) == common.next_prompts(5, state, 4, seed=7)
