"""The shared module: tiny model and tokenizer, loading, templates, sampling, log-probs, data, checkpoints."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common


# ------------------------------------------------------------------------- tiny model and tokenizer

def test_tiny_tokenizer_round_trips_after_reload(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)  # the way any real model is loaded
    texts = ["<think>\n 12 + 345 = 357\n\n  carry 1</think>\n<answer>\\boxed{357}</answer>",
             "Schön, 3 × 4 = 12 — ok?\ttab", "x^2 + 2xy + y^2 = (x + y)^2"]
    for t in texts:
        assert tok.decode(tok(t)["input_ids"]) == t
    for tag in common.TAGS:  # each tag is one token, and survives skip_special_tokens
        ids = tok(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == tag
    assert tok.convert_ids_to_tokens(tok("2024")["input_ids"]) == ["2", "0", "2", "4"]  # digits split
    assert tok.eos_token == common.EOS and tok.pad_token == common.PAD and tok.eos_token_id != tok.pad_token_id


def test_tiny_model_loads_like_a_real_one(tiny_dir, tiny):
    model, tok = tiny
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert common.eos_ids(model, tok) == [tok.eos_token_id]
    again = AutoModelForCausalLM.from_pretrained(tiny_dir)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------- names and loading

@pytest.mark.parametrize("name, want", [
    ("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
    ("Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-Math-1.5B-Instruct"),
    ("DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    ("Llama-3.2-1B", "meta-llama/Llama-3.2-1B"),
    ("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
    ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B"),
])
def test_short_names_map_to_hub_ids(name, want):
    assert common.model_candidates(name) == [("hub id", want)]


def test_unknown_model_is_one_clear_error(tmp_path):
    with pytest.raises(common.UserError) as e:
        common.load_model("Qwen2.5-does-not-exist")
    msg = str(e.value)
    assert "Qwen2.5-does-not-exist" in msg and "Qwen/Qwen2.5-does-not-exist" in msg and "tried" in msg
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_model(str(tmp_path / "missing-folder"))


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


# ------------------------------------------------------------------------- sampling

def encode(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def test_sampling_batched_equals_one_prompt_at_a_time(sharp):
    """Left padding, cache and positions are right: greedy completions do not depend on the batch."""
    model, tok = sharp
    prompts = encode(tok, ["12 + 34 =", "the answer is 7 so we get", "1"])  # different lengths
    out = common.sample(model, prompts, 2, 12, [tok.eos_token_id], tok.pad_token_id, temperature=0)
    assert out["ids"].shape[0] == 6
    for p in range(3):
        alone = common.sample(model, prompts[p:p + 1], 1, 12, [tok.eos_token_id], tok.pad_token_id, temperature=0)
        n = alone["ids"].shape[1]
        for g in range(2):  # prompt-major order: rows 2p, 2p + 1 belong to prompt p
            assert torch.equal(out["ids"][2 * p + g, :n], alone["ids"][0])


def test_sampling_mask_and_truncation_flags(sharp):
    """A hand-built case: declare as end token a token greedy decoding emits at a known place."""
    model, tok = sharp
    prompts = encode(tok, ["12 + 34 =", "the answer is"])
    free = common.sample(model, prompts, 1, 10, [tok.eos_token_id], tok.pad_token_id, temperature=0)["ids"]
    end = int(free[0, 3])  # prompt 0's 4th greedy token becomes the end token
    k0 = free[0].tolist().index(end)  # its first occurrence
    out = common.sample(model, prompts, 1, 10, [end], tok.pad_token_id, temperature=0)
    ids, mask, trunc = out["ids"], out["mask"], out["truncated"]
    assert mask[0].tolist() == [1] * (k0 + 1) + [0] * (ids.shape[1] - k0 - 1)  # end token included
    assert ids[0, :k0 + 1].tolist() == free[0, :k0 + 1].tolist()
    assert (ids[0, k0 + 1:] == tok.pad_token_id).all()
    assert not trunc[0]
    # the end token as the very last allowed token: ended, not truncated
    exact = common.sample(model, prompts[:1], 1, k0 + 1, [end], tok.pad_token_id, temperature=0)
    assert exact["mask"][0].tolist() == [1] * (k0 + 1) and not exact["truncated"][0]
    cut = common.sample(model, prompts[:1], 1, k0, [end], tok.pad_token_id, temperature=0)
    assert cut["mask"][0].tolist() == [1] * k0 and cut["truncated"][0]
    row1 = free[1].tolist()
    if end in row1:  # prompt 1 stops at its own first end token, else runs to the limit
        k1 = row1.index(end)
        assert mask[1].sum() == k1 + 1 and not trunc[1]
    else:
        assert mask[1].sum() == 10 and trunc[1] and ids.shape[1] == 10


def test_sampling_is_seeded_and_respects_top_p(tiny):
    model, tok = tiny
    prompts = encode(tok, ["12 + 34 ="])
    run = lambda seed, top_p: common.sample(model, prompts, 4, 8, [tok.eos_token_id], tok.pad_token_id, 1.0, top_p,
                                            torch.Generator().manual_seed(seed))["ids"]
    assert torch.equal(run(1, 1.0), run(1, 1.0))
    assert not torch.equal(run(1, 1.0), run(2, 1.0))
    # top-p so small that only the most likely token survives: sampling is greedy
    greedy = common.sample(model, prompts, 4, 8, [tok.eos_token_id], tok.pad_token_id, temperature=0)["ids"]
    assert torch.equal(run(3, 1e-6), greedy)


def test_sample_next_draws_each_token_with_its_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])  # the last one never
    logits = probs.clamp(min=1e-30).log()[None].expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([common.sample_next(logits, 1.0, 1.0, g) for _ in range(5)])  # 20,000 draws
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    # binomial standard deviations are at most 0.0036: 0.015 is over 4 of them
    assert torch.allclose(freq, probs, atol=0.015) and freq[4] == 0
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.81, 0.96, 0.999999])  # the inverse CDF at hand-picked points
    assert common.sample_next(probs.log()[None].expand(7, -1), 1.0, 1.0, u=u).tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_finished_completions_leave_the_batch_without_changing_the_others(sharp, monkeypatch):
    """A row that ends stops costing forward passes, and the rows still sampling draw what
    they would have drawn had nothing ended (each row has its own random numbers)."""
    model, tok = sharp
    prompts = encode(tok, ["12 + 34 =", "the answer is 7 so we get"])
    run = lambda eos: common.sample(model, prompts, 4, 16, eos, tok.pad_token_id, 1.0, 1.0,  # noqa: E731
                                    torch.Generator().manual_seed(3))
    free = run([])
    counts = torch.bincount(free["ids"][:, :8].flatten())
    end = int(counts.argmax())  # a token sampled early in several rows becomes the end token
    sizes = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: sizes.append(kw["input_ids"].shape[0]) or real_forward(**kw))
    out = run([end])
    ended = ~out["truncated"]
    assert 0 < int(ended.sum()) < 8
    for i in range(8):  # each row equals the free run's up to its end token, then padding
        n = int(out["mask"][i].sum())
        assert out["ids"][i, :n].tolist() == free["ids"][i, :n].tolist()
        assert bool(ended[i]) == (end in free["ids"][i, :16].tolist())
    # the prompts' pass, then one pass a token with the rows that have not ended by then
    last = [int(out["mask"][i].sum()) - 1 if ended[i] else 16 for i in range(8)]  # each row's last token
    want = [sum(k > t for k in last) for t in range(len(sizes) - 1)]
    assert sizes == [2] + want and want[-1] < 8


@pytest.mark.parametrize("attention, window", [("sdpa", None), ("eager", None), ("sdpa", 5)])
def test_sampling_equals_decoding_without_a_cache(tiny, attention, window):
    """The sampler's cache, positions and masks (its own 4D mask for SDPA, Hugging Face's for
    eager attention and for sliding-window layers, whose caches keep only the window) give
    the tokens of plain greedy decoding: the whole sequence through the model at every step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base, tok = tiny
    fields = {k: v for k, v in base.config.to_dict().items() if k != "layer_types"}  # derived from the window
    config = Qwen2Config(**{**fields, "use_sliding_window": window is not None, "sliding_window": window or 4096,
                            "max_window_layers": 0})
    config._attn_implementation = attention
    assert ("sliding_attention" in config.layer_types) == (window is not None)
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # context-sensitive, as the `sharp` fixture
    prompts = encode(tok, ["12 + 34 =", "the answer is 7 so we get"])  # different lengths: left padding
    out = common.sample(model, prompts, 2, 10, [tok.eos_token_id], tok.pad_token_id, temperature=0)
    for p, prompt in enumerate(prompts):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
                if seq[-1] == tok.eos_token_id:
                    break
        want = seq[len(prompt):]
        for g in range(2):
            assert out["ids"][2 * p + g, :len(want)].tolist() == want


def test_sample_next_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probs ~ .64 .24 .09 .03
    g = torch.Generator().manual_seed(0)
    seen = {int(common.sample_next(logits, 1.0, 0.8, g)) for _ in range(300)}
    assert seen == {0, 1}  # .64 < .8 needs the second token; .88 >= .8 stops there


# ------------------------------------------------------------------------- log-probs

def test_chunked_logprobs_and_their_gradients_equal_the_textbook_ones(tiny, monkeypatch):
    """One sequence a chunk (as a large vocabulary makes it), recomputed in the backward pass:
    the values and the weights' gradients of plain log_softmax over the whole batch."""
    model, tok = tiny
    prompts = encode(tok, ["12 + 34 =", "the answer is 7", "1"])
    completions = [[40, 41, 42, 43], [50, 51], [60, 61, 62]]
    p_ids, p_mask, ids, mask = common.pad_batch(prompts, completions, tok.pad_token_id, "cpu")
    weights = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.7, 1.1, 0, 0], [-1.0, 2.0, 0.3, 0]])

    def grads(logp):
        model.zero_grad()
        (logp * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(common, "LOGIT_CHUNK", 1)
    got = common.completion_logprobs(model, p_ids, p_mask, ids, mask, temperature=0.7)
    got_grads = grads(got)
    x = torch.cat([p_ids, ids], 1)
    attn = torch.cat([p_mask, mask], 1)
    logits = model(input_ids=x, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    lp = (logits[:, p_ids.shape[1] - 1:-1] / 0.7).log_softmax(-1)
    want = lp.gather(-1, ids[..., None]).squeeze(-1) * mask
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(got_grads, grads(want)):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(g.abs().max() > 1e-3 for g in got_grads)

def test_completion_logprobs_equal_full_sequence_forward(sharp):
    model, tok = sharp
    prompts = encode(tok, ["12 + 34 =", "the answer is 7 so we get 12 + 5"])
    out = common.sample(model, prompts, 3, 9, [tok.eos_token_id], tok.pad_token_id, 1.0, 1.0,
                        torch.Generator().manual_seed(0))
    lengths = out["mask"].sum(1).tolist()
    completions = [out["ids"][i, :lengths[i]].tolist() for i in range(6)]
    p_ids, p_mask, ids, mask = common.pad_batch([prompts[i // 3] for i in range(6)], completions,
                                                tok.pad_token_id, "cpu")
    for temperature in [1.0, 0.7]:
        with torch.no_grad():
            logp, ent = common.completion_logprobs(model, p_ids, p_mask, ids, mask, temperature, with_entropy=True)
        for i in range(6):  # reference: each sequence alone, no padding, the plain textbook way
            seq = torch.tensor([prompts[i // 3] + completions[i]])
            with torch.no_grad():
                logits = model(seq).logits[0, len(prompts[i // 3]) - 1:-1] / temperature
            lp = logits.log_softmax(-1)
            want = lp.gather(-1, torch.tensor(completions[i])[:, None]).squeeze(-1)
            want_ent = -(lp.exp() * lp).sum(-1)
            n = len(completions[i])
            assert torch.allclose(logp[i, :n], want, atol=1e-5)
            assert torch.allclose(ent[i, :n], want_ent, atol=1e-4)
            assert (logp[i, n:] == 0).all()


# ------------------------------------------------------------------------- data and checkpoints

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


def test_checkpoint_is_atomic_and_loads_back(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    path = tmp_path / "step-000001"
    common.save_checkpoint(path, model, tok, {"lr": 0.1})
    assert json.loads((path / "args.json").read_text()) == {"lr": 0.1}
    assert AutoModelForCausalLM.from_pretrained(path) is not None

    # a crash in the middle of writing the next one leaves the previous one intact
    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(type(tok), "save_pretrained", crash)
    with pytest.raises(OSError):
        common.save_checkpoint(path, model, tok, {"lr": 0.2})
    assert json.loads((path / "args.json").read_text()) == {"lr": 0.1}
    reloaded, _ = common.load_model(str(path))
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    monkeypatch.undo()
    common.save_checkpoint(path, model, tok, {"lr": 0.3})  # overwriting works and cleans up
    assert json.loads((path / "args.json").read_text()) == {"lr": 0.3}
    assert sorted(os.listdir(tmp_path)) == ["step-000001"]


def test_device_and_dtype_choice():
    assert common.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert common.pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert common.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="--device cuda"):
            common.pick_device("cuda")
    with pytest.raises(common.UserError, match="--device gpu: not a device"):
        common.pick_device("gpu")


def test_local_folder_and_bare_ids(tiny_dir):
    assert common.model_candidates(tiny_dir) == [("local folder", tiny_dir)]
    assert common.model_candidates("gpt2") == [("hub id", "gpt2")]
