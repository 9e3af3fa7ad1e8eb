"""The real tokenizers of Qwen2.5, Qwen3 and Llama-3.2, and the DeepSeek-R1-Distill chat
template, on models with random weights: the real configs shrunk to one narrow layer but
with the real vocabulary, special tokens and generation config (end tokens, padded rows).

This is where GRPO projects break on real checkpoints: a chat template that opens <think>
for the model, sampling that never stops on the template's end-of-turn token, ids past
the tokenizer's vocabulary, a tokenizer without a pad token, a doubled begin-of-text.

The Qwen2.5 files (Apache-2.0) are in tests/real/; the others are read from the project's
sibling folder ../shared/real/ and their tests skip, saying so, where it is absent.
"""

import gzip
import json
import os
import shutil

import pytest
import torch

import rewards as R
from nanor1 import common, models, sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "real")
QWEN25 = os.path.join(ROOT, "tests", "real", "qwen2.5-0.5b-instruct")  # tokenizer.json gzipped
SOURCES = {"qwen2.5": QWEN25,
           "qwen3": os.path.join(SHARED, "tok_qwen3-0.6b"),
           "llama3.2": os.path.join(SHARED, "tok_llama-3.2-1b-instruct"),
           "r1-distill": QWEN25,  # the Qwen2.5 tokenizer with R1-Distill's template and special tokens
           "r1-distill-think": QWEN25}  # the later revision, whose prompt ends in <think>\n
R1_TEMPLATE_FILE = os.path.join(SHARED, "chat_template_r1-distill-qwen", "tokenizer_config.json")
# each family's end-of-turn token: what the chat template writes after an assistant's message
END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3.2": "<|eot_id|>",
               "r1-distill": "<｜end▁of▁sentence｜>", "r1-distill-think": "<｜end▁of▁sentence｜>"}
FAMILIES = list(SOURCES)


def need(family):
    missing = [p for p in [SOURCES[family]] + ([R1_TEMPLATE_FILE] if family.startswith("r1") else [])
               if not os.path.exists(p)]
    if missing:
        pytest.skip(f"the real files are not here: {', '.join(missing)} (tests/real/README.md says where each comes from)")


def build(family, out):
    """A one-layer model of the family's real config (real vocabulary, end tokens and padded
    rows, random weights) with its real tokenizer, written to `out` like any checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    need(family)
    src = SOURCES[family]
    os.makedirs(out)
    for name in ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.json"]:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), out)
    if os.path.exists(os.path.join(src, "tokenizer.json.gz")):
        with gzip.open(os.path.join(src, "tokenizer.json.gz")) as f:
            with open(os.path.join(out, "tokenizer.json"), "wb") as g:
                shutil.copyfileobj(f, g)
    config = AutoConfig.from_pretrained(out)
    config.update({"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 8, "max_window_layers": 1,
                   "layer_types": ["full_attention"]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    if family.startswith("r1"):  # DeepSeek's own special tokens, added as in its tokenizer
        with open(R1_TEMPLATE_FILE) as f:
            template = json.load(f)["chat_template"]
        if family == "r1-distill-think":  # the later revision opens the thinking for the model
            template += "{% if add_generation_prompt and not ns.is_tool %}{{'<think>\\n'}}{% endif %}"
        tok.add_special_tokens({"bos_token": "<｜begin▁of▁sentence｜>",
                                "eos_token": "<｜end▁of▁sentence｜>",
                                "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]})
        tok.chat_template = template
        model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module", params=FAMILIES)
def real(request, tmp_path_factory):
    """(family, folder, model, tok) for each family; the model loaded as every script loads it."""
    folder = build(request.param, tmp_path_factory.mktemp("real") / request.param)
    model, tok = models.load_model(folder)
    return request.param, folder, model.eval(), tok


def force(model, script):
    """Make the model write `script` (token ids), one token a forward pass and then its last
    one forever, whatever it samples: a huge logit on the scripted token at each step."""
    calls = []

    def hook(module, inputs, logits):
        k = min(len(calls), len(script) - 1)
        calls.append(k)
        logits = logits.clone()
        logits[..., script[k]] += 1e4
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


QUESTION = "What is 6 * 7?"
RIGHT = "<think>\n6 * 7 = 42.\n</think>\n<answer>42</answer>"

# ----------------------------------------------------------------------------------------
# prompts: the tokenizer's own chat template, except where a template opens <think>


def test_chat_prompt_is_the_tokenizers_own(real):
    family, _, _, tok = real
    ours = common.format_prompt(QUESTION, tok, "chat")
    theirs = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=False)
    ids = common.encode_prompt(QUESTION, tok, "chat")
    if family == "r1-distill-think":  # the one deliberate change: the model opens <think> itself
        assert theirs.endswith("<｜Assistant｜><think>\n") and ours == theirs[: -len("<think>\n")]
    else:
        assert ours == theirs
    assert tok.decode(ids) == ours  # the ids are the text's, special tokens included
    if family == "qwen2.5":  # Qwen2.5's default system prompt is part of it
        assert ours.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    if family == "qwen3":  # thinking mode (the default): no <think> in the prompt, the model writes it
        assert "<think>" not in ours
    bos = tok.bos_token_id
    if bos is not None and bos in ids:  # Llama and R1-Distill: the template's own begin-of-text, once
        assert ids.count(bos) == 1 and ids[0] == bos


def test_qwen3_thinking_mode_is_the_prompt_nanor1_renders(tmp_path):
    """Qwen3's enable_thinking=False closes an empty <think></think> in the prompt, where the
    model could no longer earn the format reward; nanoR1 never passes it, so the prompt is
    the default thinking mode's, which leaves <think> to the model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build("qwen3", tmp_path / "qwen3"))
    closed = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=False, enable_thinking=False)
    assert closed.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert common.format_prompt(QUESTION, tok, "chat") == closed[: -len("<think>\n\n</think>\n\n")]

# ----------------------------------------------------------------------------------------
# sampling: stops on every end token; never past the tokenizer's vocabulary


def test_every_end_token_of_the_generation_config_ends_a_completion(real):
    family, folder, model, tok = real
    with open(os.path.join(folder, "generation_config.json")) as f:
        named = json.load(f)["eos_token_id"]
    named = {named} if isinstance(named, int) else set(named)
    eos = models.eos_ids(model, tok)
    assert named | {tok.convert_tokens_to_ids(END_OF_TURN[family])} <= set(eos)
    prompt = common.encode_prompt(QUESTION, tok, "chat")
    word = tok("Hi", add_special_tokens=False)["input_ids"][0]
    for end in eos:
        handle = force(model, [word, end, word])
        try:
            out = sampling.sample(model, [prompt], 2, 8, eos, tok.pad_token_id, 1.0, 1.0,
                                  torch.Generator().manual_seed(0), vocab=len(tok))
        finally:
            handle.remove()
        assert out["ids"].tolist() == [[word, end]] * 2, tok.convert_ids_to_tokens([end])
        assert out["mask"].tolist() == [[1, 1]] * 2 and not out["truncated"].any()


def test_nothing_is_sampled_past_the_tokenizer(real):
    family, _, model, tok = real
    rows = model.get_output_embeddings().weight.shape[0]
    if rows == len(tok):
        pytest.skip(f"{family}: the model has exactly the tokenizer's {rows} rows")
    assert family.startswith("qwen") or family.startswith("r1")
    assert rows == 151936 and len(tok) < rows  # Qwen pads 151,665 tokens (R1-Distill adds some) to 151,936

    def boost(module, inputs, logits):  # every padded row far above every real token
        logits = logits.clone()
        logits[..., len(tok):] += 50.0
        return logits

    handle = model.get_output_embeddings().register_forward_hook(boost)
    try:  # through rollout, as grpo.py, sft.py and reject_sample.py sample
        prompt = common.encode_prompt(QUESTION, tok, "chat")
        rows = sampling.rollout(model, tok, [{"prompt": QUESTION}], [prompt], 4, 16, 1.0, 1.0, [],
                                R.scorer("format"), torch.Generator().manual_seed(0), {})
    finally:
        handle.remove()
    assert [len(r["completion"]) for r in rows] == [16] * 4
    assert max(max(r["completion"]) for r in rows) < len(tok)


def test_training_log_probs_leave_out_the_padded_rows(real):
    """grpo.py's log-probs are those of the distribution sampling draws from: the softmax over
    the tokenizer's entries, whatever the padded rows hold."""
    import grpo

    family, _, model, tok = real
    prompt = torch.tensor([common.encode_prompt(QUESTION, tok, "chat")])
    ids = torch.tensor([tok("<think>\n42", add_special_tokens=False)["input_ids"]])
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    with torch.no_grad():
        logits = model(torch.cat([prompt, ids], 1)).logits[0, prompt.shape[1] - 1:-1, :len(tok)]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, :, None]).squeeze(-1)
        got = grpo.completion_logprobs(model, prompt, ones(prompt), ids, ones(ids), vocab=len(tok))[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

# ----------------------------------------------------------------------------------------
# rewards: a right answer scores 1 whatever the template; sft trains what sampling stops on


def test_a_right_answer_scores_1_through_sampling_and_decoding(real):
    family, _, model, tok = real
    eos = models.eos_ids(model, tok)
    end = tok.convert_tokens_to_ids(END_OF_TURN[family])
    script = tok(RIGHT, add_special_tokens=False)["input_ids"] + [end]
    prompt = common.encode_prompt(QUESTION, tok, "chat")
    handle = force(model, script)
    try:
        rows = sampling.rollout(model, tok, [{"prompt": QUESTION, "answer": "42"}], [prompt], 1, 40, 1.0, 1.0,
                                eos, R.scorer("accuracy,format"), torch.Generator().manual_seed(0), {})
    finally:
        handle.remove()
    assert rows[0]["completion"] == script and not rows[0]["truncated"]
    assert rows[0]["text"] == RIGHT  # the end token is not part of the text
    assert rows[0]["parts"] == {"accuracy": 1.0, "format": 1.0}


def test_sft_trains_the_completion_and_the_end_of_turn_token(real):
    import sft

    family, _, model, tok = real
    end = sft.end_token(model, tok, "chat")
    assert tok.convert_ids_to_tokens([end]) == [END_OF_TURN[family]]
    assert end in models.eos_ids(model, tok)  # what sft.py teaches to end on, sampling stops on
    ex = {"prompt": QUESTION, "completion": RIGHT, "_where": "x.jsonl:1"}
    ids, start = sft.encode_example(ex, tok, "chat", end)
    assert ids[:start] == common.encode_prompt(QUESTION, tok, "chat")
    assert ids[start:] == tok(RIGHT, add_special_tokens=False)["input_ids"] + [end]
    _, _, mask = sft.collate([(ids, start)], tok.pad_token_id, torch.device("cpu"))
    assert mask[0].tolist() == [0] * start + [1] * (len(ids) - start)  # exactly the completion and its end
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) <= 1  # a template's begin-of-text is not doubled

# ----------------------------------------------------------------------------------------
# the three scripts, end to end, on a real vocabulary: Llama's tokenizer has no pad token


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3.2", "qwen2.5"])
def test_grpo_sft_and_rejection_sampling_run(family, tmp_path, monkeypatch):
    import grpo
    import reject_sample
    import sft
    from transformers import AutoTokenizer

    folder = build(family, tmp_path / family)
    if family == "llama3.2":
        assert AutoTokenizer.from_pretrained(folder).pad_token is None
    data = tmp_path / "q.jsonl"
    with open(data, "w") as f:
        for a in range(4):
            f.write(json.dumps({"prompt": f"What is {a} + 2?", "answer": str(a + 2),
                                "completion": f"<think>{a} + 2 = {a + 2}</think><answer>{a + 2}</answer>"}) + "\n")
    common_flags = ["--model", folder, "--data", str(data), "--device", "cpu", "--template", "chat"]
    vocabs = []  # what grpo.py's log-probs are taken over
    logprobs = grpo.completion_logprobs
    monkeypatch.setattr(grpo, "completion_logprobs", lambda *a, **k: vocabs.append(k.get("vocab")) or logprobs(*a, **k))
    sft.main(common_flags + ["--out", str(tmp_path / "sft"), "--num-steps", "2", "--batch-size", "4",
                             "--micro-batch-size", "2"])
    history = grpo.main(common_flags + ["--out", str(tmp_path / "rl"), "--num-steps", "2", "--prompts-per-step",
                                        "2", "--group", "4", "--max-new-tokens", "8", "--sample-every", "0"])
    assert [h["step"] for h in history] == [1, 2] and history[0]["kl"] == 0
    assert vocabs and set(vocabs) == {len(AutoTokenizer.from_pretrained(folder))}  # the reference's and the policy's
    report = reject_sample.main(common_flags + ["--out", str(tmp_path / "kept.jsonl"), "--num-samples", "2",
                                                "--max-new-tokens", "8"])
    assert (report["prompts"], report["samples"]) == (4, 8) and 0 < report["len"] <= 8
    assert os.path.exists(tmp_path / "sft" / "step-000002" / "model.safetensors")
