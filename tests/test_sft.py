"""sft.py: what the loss covers, the loss and the KD term against references, batching,
the schedule, runs that overfit and reproduce, distillation, and bad input."""

import json
import math
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sft
from nanor1 import common, models, sampling

PAIRS = [("What is 12 + 7?", "<think> 12 + 7 = 19 </think> <answer> 19 </answer>"),
         ("Add 3 and 40", "<think> 3 + 40 = 43. so the answer is 43 </think> <answer> 43 </answer>"),
         ("What is 8 * 9?", "<think> 8 * 9 = 72 </think> <answer> 72 </answer>"),
         ("What is 100 - 1?", "<think> 100 - 1 = 99 </think> <answer> 99 </answer>")]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def run(model_dir, data, out, *extra):
    argv = ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", *extra]
    return sft.main(argv)


def example(prompt, completion, where="t.jsonl:1"):
    return {"prompt": prompt, "completion": completion, "_where": where}


# ------------------------------------------------------------------------- what the loss covers

def test_loss_mask_is_exactly_the_completion_and_end_token(tiny, tmp_path):
    _, tok = tiny
    prompt, completion = PAIRS[1]
    ids, start = sft.encode_example(example(prompt, completion), tok, "r1", tok.eos_token_id)
    other, _ = sft.encode_example(example(*PAIRS[0]), tok, "r1", tok.eos_token_id)
    batch_ids, attn, mask = sft.collate([(other, 5), (ids, start)], tok.pad_token_id, "cpu")  # row 1 is padded
    row, m = batch_ids[1].tolist(), mask[1].bool()
    assert tok.decode([t for t, k in zip(row, m) if k]) == completion + models.EOS
    assert tok.decode([t for t, k in zip(row, m) if not k and t != tok.pad_token_id]) == \
        common.format_prompt(prompt, tok, "r1")
    assert row[int(m.nonzero().max())] == tok.eos_token_id  # the last trained token is the end token
    assert mask[0].sum() == len(other) - 5 and attn[0].sum() == len(other)
    # the prompt is encoded exactly as grpo.py encodes it, so RL sees the tokens SFT trained on
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt}])
    _, grpo_ids = common.load_prompts(path, tok, "r1")
    assert ids[:start] == grpo_ids[0]
    # the chat form with one question is the same example; plain text trains every token but the first
    chat = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            "_where": "t.jsonl:2"}
    assert sft.encode_example(chat, tok, "r1", tok.eos_token_id) == (ids, start)
    text, start = sft.encode_example({"text": "12 + 7 = 19", "_where": "t.jsonl:3"}, tok, "r1", tok.eos_token_id)
    assert start == 0 and tok.decode(text) == "12 + 7 = 19" + models.EOS
    assert sft.collate([(text, 0)], tok.pad_token_id, "cpu")[2].tolist() == [[0] + [1] * (len(text) - 1)]
    # an end token already written at the end of the completion is not doubled
    assert sft.encode_example(example(prompt, completion + models.EOS), tok, "r1", tok.eos_token_id) == (ids, len(grpo_ids[0]))


def test_conversation_trains_the_last_assistant_turn_under_the_chat_template(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "<think> 3+3 </think> <answer> 6 </answer>"}]
    ids, start = sft.encode_example({"messages": msgs, "_where": "c.jsonl:1"}, tok, "chat", tok.eos_token_id)
    assert tok.decode(ids[:start]) == "<|system|>Be brief.\n<|user|>2+2?\n<|assistant|>4\n<|user|>and 3+3?\n<|assistant|>"
    assert tok.decode(ids[start:]) == msgs[-1]["content"] + models.EOS
    with pytest.raises(common.UserError, match=r"c.jsonl:1: --template r1: a conversation of several turns"):
        sft.encode_example({"messages": msgs, "_where": "c.jsonl:1"}, tok, "r1", tok.eos_token_id)


def test_end_token_is_the_chat_templates_own_when_sampling_stops_on_it(tiny_dir):
    model, tok = models.load_model(tiny_dir)
    # an instruct-style template that ends each turn with a token of its own
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert sft.end_token(model, tok, "chat") == tok.eos_token_id  # sampling would not stop on <|im_end|>
    model.generation_config.eos_token_id = [tok.eos_token_id, im_end]  # as Qwen2.5-Instruct ships
    assert sft.end_token(model, tok, "chat") == im_end
    assert sft.end_token(model, tok, "r1") == tok.eos_token_id
    ids, start = sft.encode_example(example("2+2?", "4<|im_end|>"), tok, "chat", im_end)
    assert tok.decode(ids[start:]) == "4<|im_end|>"  # written at the end or not, it is there once


def test_prompt_begins_with_the_tokenizers_bos_and_the_completion_does_not(tiny):
    from tokenizers import processors

    _, tok = tiny
    tok = __import__("copy").deepcopy(tok)
    tok.add_special_tokens({"bos_token": "<s>"})  # like Llama's tokenizers, which add <s> to every text
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    ids, start = sft.encode_example(example("2+2?", "<answer> 4 </answer>"), tok, "r1", tok.eos_token_id)
    assert ids[0] == bos and ids.count(bos) == 1 and start > 1
    text, start = sft.encode_example({"text": "2 + 2 = 4", "_where": "t:1"}, tok, "r1", tok.eos_token_id)
    assert text[0] == bos and text.count(bos) == 1 and start == 0  # <s> is the context, never a target


def test_token_losses_equal_the_models_own_cross_entropy(sharp):
    """Against an independent reference: Hugging Face's loss with labels (-100 = not trained)."""
    model, tok = sharp
    seqs = [sft.encode_example(example(p, c), tok, "r1", tok.eos_token_id) for p, c in PAIRS]
    ids, attn, mask = sft.collate(seqs, tok.pad_token_id, "cpu")
    nll, kl = sft.token_losses(model, ids, attn, mask, vocab=len(tok))
    assert kl is None and (nll[mask == 0] == 0).all()
    for i in range(len(seqs)):  # one sequence at a time, unpadded
        one = ids[i:i + 1, :len(seqs[i][0])]
        labels = one.masked_fill(mask[i:i + 1, :one.shape[1]] == 0, -100)
        ref = model(input_ids=one, labels=labels).loss
        assert (nll[i].sum() / mask[i].sum()).item() == pytest.approx(ref.item(), rel=1e-5)


def test_logits_past_the_tokenizer_are_left_out(tiny):
    """Models pad their output layer past the vocabulary (Qwen2.5: 151,936 rows for 151,665 tokens,
    and 152,064 at 7B); those rows are no tokens, and a teacher's may number differently."""
    model, tok = tiny
    V = len(tok)

    def padded(extra, value):
        m = models.new_model(tok)
        m.load_state_dict(model.state_dict())
        m.resize_token_embeddings(V + extra)
        with torch.no_grad():
            m.get_output_embeddings().weight[V:] = value  # rows that would win every softmax
        return m.eval()

    seqs = [sft.encode_example(example(p, c), tok, "r1", tok.eos_token_id) for p, c in PAIRS[:2]]
    ids, attn, mask = sft.collate(seqs, tok.pad_token_id, "cpu")
    plain, _ = sft.token_losses(model, ids, attn, mask, vocab=V)
    student, teacher = padded(8, 1.0), padded(24, -1.0)
    nll, kl = sft.token_losses(student, ids, attn, mask, teacher, vocab=V)
    assert torch.allclose(nll, plain, atol=1e-5)
    assert kl.abs().max() < 1e-5  # the same real rows: the same distribution over the tokens
    assert sft.same_vocabulary(tok, tok) is None


def test_micro_batches_give_the_same_step_as_one_batch(tiny_dir, tmp_path):
    """Each micro-batch adds its share of the batch's mean per token: same loss, same gradient."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    runs = [run(tiny_dir, data, tmp_path / f"m{k}", "--micro-batch-size", str(k), "--num-steps", "3",
                "--val-fraction", "0", "--grad-clip", "0") for k in (1, 4)]
    for a, b in zip(*runs):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["gnorm"] == pytest.approx(b["gnorm"], rel=1e-4)
    w1 = AutoModelForCausalLM.from_pretrained(tmp_path / "m1" / "step-000003").state_dict()
    w4 = AutoModelForCausalLM.from_pretrained(tmp_path / "m4" / "step-000003").state_dict()
    assert all(torch.allclose(w1[k], w4[k], atol=1e-5) for k in w1)


def test_grad_checkpointing_gives_the_same_step_and_bf16_a_close_one(tiny_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    flags = ["--num-steps", "2", "--val-fraction", "0"]
    plain = run(tiny_dir, data, tmp_path / "a", *flags)
    enabled, original = [], models.enable_grad_checkpointing

    def enable(model):  # see that checkpointing really is on in the run
        original(model)
        enabled.append(getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing)

    monkeypatch.setattr(models, "enable_grad_checkpointing", enable)
    ckpt = run(tiny_dir, data, tmp_path / "b", *flags, "--grad-checkpointing")
    assert enabled == [True]
    bf16 = run(tiny_dir, data, tmp_path / "c", *flags, "--dtype", "bfloat16")
    for a, b, c in zip(plain, ckpt, bf16):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["gnorm"] == pytest.approx(a["gnorm"], rel=1e-5)
        assert c["loss"] == pytest.approx(a["loss"], rel=2e-2) and c["gnorm"] == pytest.approx(a["gnorm"], rel=0.1)
        assert c["loss"] != a["loss"]  # bf16 really ran: the same numbers would mean float32


# ------------------------------------------------------------------------- batching and schedule

def test_epoch_batches_cover_every_example_once_and_group_lengths():
    lengths = [(7 * i) % 50 + 1 for i in range(40)]
    for window in (0, 2):
        batches = sft.epoch_batches(lengths, 4, epoch=0, seed=0, window=window)
        assert sorted(i for b in batches for i in b) == list(range(40)) and len(batches) == 10
        assert batches == sft.epoch_batches(lengths, 4, epoch=0, seed=0, window=window)  # seeded
        assert batches != sft.epoch_batches(lengths, 4, epoch=1, seed=0, window=window)  # a new order per epoch

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    grouped, plain = sft.epoch_batches(lengths, 4, 0, 0, 10), sft.epoch_batches(lengths, 4, 0, 0, 0)
    assert padding(grouped) < padding(plain) / 5


def test_length_grouping_cuts_the_padding_of_a_run(tiny_dir, tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "completion": " ".join(["step"] * (1 + (13 * i) % 40))}
            for i in range(32)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common_flags = ["--num-steps", "8", "--val-fraction", "0", "--batch-size", "4", "--micro-batch-size", "2",
                    "--template", "raw"]  # the completions' lengths dominate
    grouped = run(tiny_dir, data, tmp_path / "g", *common_flags)
    plain = run(tiny_dir, data, tmp_path / "p", *common_flags, "--group-by-length", "0")
    pad = [sum(r["pad"] for r in h) / len(h) for h in (grouped, plain)]
    assert pad[0] < 0.05 < pad[1] / 2, pad


def test_max_len_cuts_drops_and_splits_and_says_so(tiny, tiny_dir, tmp_path, capsys):
    _, tok = tiny
    max_len = len(common.encode_prompt("2+2?", tok, "r1")) + 30  # the R1 template is most of it
    text = "1 + 1 = 2. " * 60
    rows = [{"prompt": "2+2?", "completion": "<think> " + "4 " * 100 + "</think>"},  # cut
            {"prompt": "What is " + " + ".join(["1"] * 80) + "?", "completion": "80"},  # dropped: the prompt is too long
            {"text": text},  # split into pieces
            {"prompt": "2+2?", "completion": "4"}]  # fits
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, counts = sft.encode_examples(common.read_jsonl(path, required=()), tok, "r1", max_len,
                                           tok.eos_token_id, path)
    assert counts == {"examples": 4, "cut": 1, "dropped": 1, "split": 1}
    assert all(len(ids) <= max_len for ids, _ in examples)
    text_len = len(tok(text)["input_ids"]) + 1
    pieces = [ids for ids, start in examples if start == 0]
    assert sum(len(p) for p in pieces) == text_len and len(pieces) == math.ceil(text_len / max_len) > 1
    cut = examples[0][0]
    assert len(cut) == max_len and cut[-1] != tok.eos_token_id  # a cut completion has no end token
    run(tiny_dir, path, tmp_path / "run", "--num-steps", "1", "--max-len", str(max_len), "--val-fraction", "0")
    assert "--max-len %d, training: 1 completions cut" % max_len in capsys.readouterr().out
    assert json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["data"] == counts


def test_validation_split_is_by_record_not_by_piece(tiny_dir, tmp_path, capsys):
    """A long text split into pieces goes wholly to training or wholly to validation."""
    _, tok = models.load_model(tiny_dir)
    long = "1 + 1 = 2. " * 100
    pieces = math.ceil((len(tok(long)["input_ids"]) + 1) / 64)
    rows = [{"text": long}] + [{"text": f"{i} + {i} = {2 * i}."} for i in range(4)]  # 4 short ones: 1 piece each
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run(tiny_dir, data, tmp_path / "run", "--num-steps", "1", "--max-len", "64", "--val-fraction", "0.2")
    out = capsys.readouterr().out
    assert "4 examples for training" in out and "1 for validation" in out
    # one record held out: the long text (4 sequences left) or a short one (pieces + 3); a split by
    # sequence would hold out a fifth of all pieces + 4 instead
    assert f"4 examples for training ({pieces + 3} sequences" in out or "4 examples for training (4 sequences" in out
    assert pieces + 4 - round(0.2 * (pieces + 4)) not in (pieces + 3, 4)


# ------------------------------------------------------------------------- whole runs

def test_tiny_model_overfits_a_handful_and_greedy_decoding_reproduces_them(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    history = run(tiny_dir, data, tmp_path / "run", "--num-steps", "150", "--batch-size", "4", "--lr", "1e-2",
                  "--val-fraction", "0", "--warmup-steps", "5")
    assert history[0]["ce"] > 4 and history[-1]["ce"] < 0.05
    model, tok = models.load_model(str(tmp_path / "run" / "step-000150"))
    prompts = [common.encode_prompt(p, tok, "r1") for p, _ in PAIRS]
    out = sampling.sample(model, prompts, 1, 64, models.eos_ids(model, tok), tok.pad_token_id, temperature=0)
    for (_, completion), ids, m in zip(PAIRS, out["ids"].tolist(), out["mask"].tolist()):
        assert tok.decode(ids[:sum(m)]) == completion + models.EOS


def test_run_logs_validation_and_sampled_accuracy_and_saves_checkpoints(tiny_dir, tmp_path, capsys):
    rows = [{"prompt": f"What is {i} + 1?", "completion": f"<think> {i} + 1 </think> <answer> {i + 1} </answer>"}
            for i in range(20)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    evals = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "What is 5 + 1?", "answer": "6"}])
    out = tmp_path / "run"
    history = run(tiny_dir, data, out, "--num-steps", "4", "--eval-every", "2", "--save-every", "3",
                  "--val-fraction", "0.2", "--eval-data", evals, "--eval-samples", "2", "--max-new-tokens", "16")
    printed = capsys.readouterr().out
    assert "20 examples for training" not in printed and "16 examples for training" in printed
    assert "4 for validation" in printed
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert lines[0]["args"]["num_steps"] == 4
    assert [l["step"] for l in lines if "val_loss" in l] == [0, 2, 4]
    assert [l["step"] for l in lines if "eval_pass@1" in l] == [0, 2, 4]
    assert [l["step"] for l in lines if "ce" in l] == [1, 2, 3, 4] == [h["step"] for h in history]
    for key in ["epoch", "loss", "ce", "tokens", "pad", "gnorm", "lr", "tok/s", "s"]:
        assert key in history[0], key
    assert history[0]["epoch"] == pytest.approx(0.25)  # 16 examples in batches of 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step")) == ["step-000003", "step-000004"]
    assert json.load(open(out / "step-000004" / "args.json"))["batch_size"] == 4
    # the checkpoint is a model grpo.py can start from
    import grpo
    grpo.main(["--model", str(out / "step-000004"), "--data", evals, "--out", str(tmp_path / "rl"), "--device", "cpu",
               "--num-steps", "1", "--group", "2", "--prompts-per-step", "1", "--max-new-tokens", "8"])
    assert (tmp_path / "rl" / "step-000001" / "config.json").exists()


def test_scratch_init_builds_the_sized_model(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "12 + 7 = 19. 3 + 4 = 7."}] * 8)
    sft.main(["--init", "scratch", "--hidden", "32", "--layers", "3", "--heads", "4", "--kv-heads", "1", "--mlp", "48",
              "--context", "256", "--data", data, "--out", str(tmp_path / "a"), "--device", "cpu", "--num-steps", "1",
              "--batch-size", "4", "--micro-batch-size", "4", "--tokenizer", tiny_dir])
    model, tok = models.load_model(str(tmp_path / "a" / "step-000001"))
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.max_position_embeddings) == (32, 3, 4, 1, 48, 256)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_dir).get_vocab()  # a student's shared vocabulary


# ------------------------------------------------------------------------- logit distillation

class FixedLM(torch.nn.Module):
    """A stand-in language model whose next-token logits are the same at every position."""

    def __init__(self, logits):
        super().__init__()
        self.row = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        B, L = input_ids.shape
        return types.SimpleNamespace(logits=self.row.expand(B, L, -1)[:, -logits_to_keep:])


def test_kd_loss_equals_the_kl_worked_out_by_hand():
    ids = torch.tensor([[0, 1, 2, 1, 0]])
    attn, mask = torch.ones_like(ids), torch.tensor([[0, 0, 1, 1, 1]])
    teacher = FixedLM([math.log(0.5), math.log(0.25), math.log(0.25)])  # p = (1/2, 1/4, 1/4)
    student = FixedLM([0.0, 0.0, 0.0])  # q = (1/3, 1/3, 1/3)
    nll, kl = sft.token_losses(student, ids, attn, mask, teacher)
    # KL(p || q) = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8) = 0.0588915 on each trained token
    assert kl[0].tolist() == pytest.approx([0, 0, 0.0588915, 0.0588915, 0.0588915], abs=1e-6)
    assert nll[0].tolist() == pytest.approx([0, 0] + [math.log(3)] * 3, abs=1e-6)  # q of any token is 1/3
    # at temperature 2, p becomes proportional to sqrt(p) = (sqrt2 - 1, 1 - sqrt2/2, 1 - sqrt2/2), q stays
    # uniform, and the KL is scaled by 2^2 = 4: 4 * sum p ln(3p) = 0.0568824
    _, kl2 = sft.token_losses(student, ids, attn, mask, teacher, kd_temperature=2.0)
    assert kl2[0, 2:].tolist() == pytest.approx([0.0568824] * 3, abs=1e-6)
    # the gradient reaches the student only
    (kl.sum()).backward()
    assert student.row.grad is not None and teacher.row.grad is None


def test_loss_keeps_no_float32_copies_of_the_logits_for_backward():
    """Each row's softmaxes are recomputed in the backward pass: what waits for it is the two
    models' logits themselves, not B more (T, V) tensors per softmax (6 GiB at B 4, T 4096, V 150k)."""
    V, H, B, L = 5000, 8, 4, 40

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(V, H), torch.nn.Linear(H, V, bias=False)

        def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
            return types.SimpleNamespace(logits=self.head(self.emb(input_ids)[:, -logits_to_keep:]))

    torch.manual_seed(0)
    ids = torch.randint(0, V, (B, L))
    mask = torch.ones_like(ids)
    mask[:, :5] = 0
    student, teacher = LM(), LM().requires_grad_(False)
    weights = {p.untyped_storage().data_ptr() for p in [*student.parameters(), *teacher.parameters()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights and t.shape[-1:] == (V,):  # logits-sized tensors
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, kl = sft.token_losses(student, ids, torch.ones_like(ids), mask, teacher, 2.0, V)
    logits_bytes = B * (L - 4) * V * 4  # positions 4 .. L-1 reach the head, float32
    assert sum(saved.values()) <= 2 * logits_bytes  # the student's and the teacher's, nothing more
    (nll.sum() + kl.sum()).backward()  # and the recomputation gives a gradient


def test_kd_against_torch_kl_div_and_zero_when_teacher_is_student(tiny, sharp):
    student, tok = tiny
    teacher, _ = sharp
    seqs = [sft.encode_example(example(p, c), tok, "r1", tok.eos_token_id) for p, c in PAIRS[:2]]
    ids, attn, mask = sft.collate(seqs, tok.pad_token_id, "cpu")
    _, kl = sft.token_losses(student, ids, attn, mask, teacher, vocab=len(tok))
    s = torch.log_softmax(student(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
    t = torch.log_softmax(teacher(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
    ref = torch.nn.functional.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # (B, L-1), token t+1
    assert torch.allclose(kl[:, 1:], ref * mask[:, 1:], atol=1e-5)
    assert (kl[mask.bool()] > 0).all()
    _, same = sft.token_losses(student, ids, attn, mask, student, vocab=len(tok))
    assert same.abs().max() < 1e-6


def test_kd_run_with_the_student_as_teacher_logs_zero_kd(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    history = run(tiny_dir, data, tmp_path / "kd", "--num-steps", "2", "--val-fraction", "0", "--teacher", tiny_dir,
                  "--kd-weight", "0.5")
    assert history[0]["kd"] == pytest.approx(0, abs=1e-6)  # the same weights before the first update
    assert history[0]["loss"] == pytest.approx(0.5 * history[0]["ce"], rel=1e-6)
    assert history[1]["kd"] > 0  # the student has moved, the teacher has not


def test_kd_with_a_different_tokenizer_is_one_clear_error(tiny_dir, tmp_path, capsys):
    _, tok = models.load_model(tiny_dir)
    instruct = __import__("copy").deepcopy(tok)
    instruct.eos_token = models.PAD  # another end token over the same ids, as base and instruct models have
    assert sft.same_vocabulary(tok, instruct) is None
    other = tmp_path / "other"
    tok = models.build_tiny_tokenizer(vocab_size=300)
    model = models.new_model(tok)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    with pytest.raises(SystemExit) as e:
        run(tiny_dir, data, tmp_path / "kd", "--teacher", str(other))
    assert "its tokenizer differs from the student's" in str(e.value) and "reject_sample.py" in str(e.value)


# ------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("line, message", [
    ("{not json", r"d.jsonl:2: not valid JSON"),
    (json.dumps({"prompt": "2+2?"}), r"d.jsonl:2: missing field 'completion'"),
    (json.dumps({"answer": "4"}), r"d.jsonl:2: expected one of 'prompt' and 'completion', 'messages', or 'text'$"),
    (json.dumps({"prompt": "2+2?", "completion": "4", "text": "4"}), r"d.jsonl:2: .*not fields of several "
                                                                      r"\(prompt/completion, text\)"),
    (json.dumps({"prompt": " ", "completion": "4"}), r"d.jsonl:2: the prompt is empty"),
    (json.dumps({"prompt": "2+2?", "completion": 4}), r"d.jsonl:2: field 'completion' must be a string"),
    (json.dumps({"prompt": "2+2?", "completion": "  "}), r"d.jsonl:2: the completion is empty"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"d.jsonl:2: the last message must be"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), r"d.jsonl:2: messages\[0\] must be"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), r"d.jsonl:2: 'messages' needs a user turn"),
    (json.dumps({"text": ""}), r"d.jsonl:2: the text is empty"),
])
def test_malformed_line_is_reported_as_file_and_line(tiny, tmp_path, line, message):
    _, tok = tiny
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "completion": "2"}) + "\n" + line + "\n")
    with pytest.raises(common.UserError, match=message):
        sft.encode_examples(common.read_jsonl(str(path), required=()), tok, "r1", 64, tok.eos_token_id, str(path))


@pytest.mark.parametrize("flags, message", [
    ([], "--model is required"),
    (["--model", "m", "--init", "scratch"], "--model and --init scratch"),
    (["--model", "m", "--tokenizer", "t"], "--tokenizer is only for --init scratch"),
    (["--model", "m", "--kd-weight", "0.5"], "--kd-weight needs --teacher"),
    (["--model", "m", "--teacher", "t", "--kd-weight", "2"], "--kd-weight must be in"),
    (["--model", "m", "--batch-size", "2", "--micro-batch-size", "4"], "--micro-batch-size must not exceed"),
    (["--model", "m", "--val-fraction", "1"], "--val-fraction must be in"),
    (["--model", "m", "--epochs", "0"], "--epochs must be > 0"),
    (["--model", "m", "--max-len", "1"], "--max-len must be at least 2"),
])
def test_bad_flags_name_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit):
        sft.get_args(["--data", "d.jsonl", *flags])
    assert message in capsys.readouterr().err


def test_bad_model_and_lengths_are_one_clear_error(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    for flags, message in [(["--max-len", "5000"], "--max-len 5000 is longer than the model's context of 1024"),
                           (["--max-len", "8"], "no example fits --max-len 8")]:
        with pytest.raises(SystemExit) as e:
            run(tiny_dir, data, tmp_path / "x", *flags)
        assert message in str(e.value)
    with pytest.raises(SystemExit) as e:
        sft.main(["--model", str(tmp_path / "missing"), "--data", data, "--out", str(tmp_path / "y")])
    assert "could not load model" in str(e.value)
