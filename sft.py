"""Supervised fine-tuning of a causal LM: R1's cold start, and distillation into a student.

R1 starts RL from a base model fine-tuned on a few thousand readable long chain-of-thought
examples (the cold start), and its small models are students fine-tuned on the samples the
teacher wrote and rejection sampling kept (sequence-level distillation). Both are this
script. The loss is the mean negative log-likelihood of the completion's tokens and of the
end token that follows them; the prompt is formatted and encoded exactly as grpo.py does
it (--template), so the model sees at RL time the tokens it was trained on. --teacher adds
logit-level distillation: the KL from the teacher's next-token distribution to the
student's on the same completion tokens (the two must share a tokenizer).

Data is jsonl, one example per line, in one of three forms:
    {"prompt": "...", "completion": "..."}      the prompt goes through --template
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"text": "..."}                             plain text, loss on every token (pretraining)
The files reject_sample.py writes are the first form; other fields are ignored.

Deliberate simplifications:
- length-grouped batches instead of packing: examples are sorted by length within windows
  of --group-by-length batches, so a micro-batch pads little and no attention crosses
  examples; the batches are then shuffled;
- in a conversation only the last assistant turn is trained on;
- a completion longer than --max-len is cut there (it then has no end token) and counted;
  plain text is split into --max-len pieces instead;
- forward KL only, on the student's vocabulary;
- several processes are plain data parallelism: each takes every N-th example of a batch
  and holds the whole model; gradients are summed once per step; process 0 evaluates;
  --fsdp shards the model as grpo.py does, every process then evaluating; --lora-rank
  trains adapters on a frozen base (peft) and saves the merged model.

    python sft.py --model Qwen2.5-0.5B --data cold_start.jsonl --out out/sft
    python sft.py --model Qwen2.5-1.5B --teacher Qwen2.5-7B --kd-weight 0.5 --data kept.jsonl
    python sft.py --init scratch --layers 4 --hidden 128 --data text.jsonl --device cpu --out out/base
    torchrun --nproc_per_node 8 sft.py --model Qwen2.5-1.5B --data kept.jsonl --batch-size 64 --out out/student
    torchrun --nproc_per_node 8 sft.py --model Qwen2.5-7B --fsdp --grad-checkpointing --data cold_start.jsonl

A run that dies goes on from its newest checkpoint with the same command plus --resume,
exactly as if uninterrupted: the checkpoint holds the optimizer, the step (the data order
and the learning rate follow from it) and every random state (tests/test_resume.py).
"""

import argparse
import functools
import math
import os
import sys

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

import rewards as R
from nanor1 import checkpoints, common, distributed, models, sampling

# flags whose change on --resume makes the run differ from an uninterrupted one (a warning names them)
RESUME_CHECKED = ["model", "data", "template", "seed", "lr", "weight_decay", "warmup_steps", "grad_clip",
                  "batch_size", "epochs", "min_lr_ratio", "kd_weight", "teacher"]


def get_args(argv=None):
    p = common.short_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    # model
    p.add_argument("--model", default=None, help="local folder, hub id, or short name (Qwen2.5-0.5B); not with --init scratch")
    p.add_argument("--init", default="pretrained", choices=["pretrained", "scratch"],
                   help="load --model, or build a fresh Qwen2 model sized by the flags below")
    p.add_argument("--tokenizer", default=None,
                   help="with --init scratch: folder or hub id whose tokenizer to use; default the project's tiny one")
    p.add_argument("--hidden", type=int, default=128, help="with --init scratch: hidden size")
    p.add_argument("--layers", type=int, default=4, help="with --init scratch: transformer layers")
    p.add_argument("--heads", type=int, default=4, help="with --init scratch: attention (query) heads")
    p.add_argument("--kv-heads", type=int, default=2, help="with --init scratch: key/value heads")
    p.add_argument("--mlp", type=int, default=512, help="with --init scratch: MLP inner size")
    p.add_argument("--context", type=int, default=1024, help="with --init scratch: maximum positions, tokens")
    p.add_argument("--template", default="r1", choices=["r1", "chat", "raw"],
                   help="prompt format, as in grpo.py: R1-Zero plain-text template, tokenizer chat template, or as is")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (weights and optimizer stay float32); auto = bfloat16 on CUDA, else float32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA adapters of this rank on every linear layer instead of all weights; 0 = off (needs peft)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator: adapters are scaled by alpha / rank")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard weights, gradients, AdamW state and the teacher over the processes (FSDP2)")
    # data
    p.add_argument("--data", required=True, help="training jsonl: prompt + completion, messages, or text")
    p.add_argument("--val-data", default=None, help="validation jsonl, same forms; default: hold out --val-fraction of --data")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of --data held out for the validation loss when there is no --val-data")
    p.add_argument("--max-len", type=int, default=None,
                   help="longest sequence trained on, prompt + completion + end, tokens; default the model's context, at most 4096")
    # distillation
    p.add_argument("--teacher", default=None, help="logit-level distillation from this model (same tokenizer as the student)")
    p.add_argument("--kd-weight", type=float, default=None,
                   help="with --teacher: loss = (1 - w) * cross-entropy + w * KL(teacher || student); default 0.5")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="with --teacher: softmax temperature of both distributions")
    # optimisation
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the data (R1's SFT: 2); unused with --num-steps")
    p.add_argument("--num-steps", type=int, default=0, help="optimizer steps; 0 = as many as --epochs take")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward/backward pass (gradients accumulate)")
    p.add_argument("--group-by-length", type=int, default=64,
                   help="sort examples by length within windows of this many batches, to pad little; 0 = random batches")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at this fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up, steps; default 3%% of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many steps in a row skipped for a non-finite loss or gradient; 0 = never")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = no clipping")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, data order, sampling and init")
    # evaluation
    p.add_argument("--eval-every", type=int, default=0,
                   help="validation loss (and with --eval-data sampled accuracy) every N steps; always at start and end")
    p.add_argument("--eval-data", default=None, help="held-out prompts with 'answer': pass@1 and format rate of sampled completions")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per eval prompt, k of pass@1")
    p.add_argument("--eval-prompts", type=int, default=0, help="eval prompts used; 0 = all")
    p.add_argument("--eval-temperature", type=float, default=0.6, help="eval sampling temperature (R1: 0.6); 0 = greedy")
    p.add_argument("--eval-top-p", type=float, default=0.95, help="eval nucleus mass (R1: 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="eval completion length limit, tokens; default 1024, or what the context leaves when less")
    # logging and output
    p.add_argument("--out", default="out/sft", help="output folder: metrics.jsonl, args.json, checkpoints")
    p.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps, and at the end; 0 = only at the end")
    p.add_argument("--save-total-limit", type=int, default=0, help="keep only the newest N checkpoints; 0 = all")
    p.add_argument("--save-optimizer", type=int, default=1, choices=[0, 1],
                   help="0: checkpoints hold the model without the optimizer's state, and cannot be resumed exactly")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run exactly: alone, from the newest checkpoint of --out; or from the checkpoint "
                        "folder given (the model comes from the checkpoint; give the run's other flags again)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run: its files go first")
    p.add_argument("--wandb-project", default=None, help="also log to this wandb project (wandb is optional)")
    args = p.parse_args(argv)

    # contradictions fail here, naming the flag, before any model is loaded
    if args.init == "pretrained" and not args.model:
        p.error("--model is required (or --init scratch to build a fresh model)")
    if args.init == "scratch" and args.model:
        p.error("--model and --init scratch: pick one (--tokenizer chooses the new model's tokenizer)")
    if args.init == "pretrained" and args.tokenizer:
        p.error("--tokenizer is only for --init scratch; a pretrained model brings its own")
    if args.max_len is not None and args.max_len < 2:
        p.error("--max-len must be at least 2")
    common.check_ranges(p, args, ["hidden", "layers", "heads", "kv_heads", "mlp", "context", "batch_size",
                                  "micro_batch_size", "eval_samples", "max_new_tokens"],
                        ["num_steps", "group_by_length", "eval_every", "eval_prompts", "save_every", "save_total_limit",
                         "max_bad_steps", "lr", "weight_decay", "grad_clip"])
    if args.micro_batch_size > args.batch_size:
        p.error("--micro-batch-size must not exceed --batch-size")
    if not args.num_steps and args.epochs <= 0:
        p.error("--epochs must be > 0 (or give --num-steps)")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if not 0 <= args.min_lr_ratio <= 1:
        p.error("--min-lr-ratio must be in [0, 1]")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error("--warmup-steps must be 0 or more")
    if args.resume and args.overwrite:
        p.error("--resume goes on with the run in --out, --overwrite removes it: pick one (after a run "
                "started with --overwrite, drop it to add --resume)")
    if args.kd_weight is not None and not args.teacher:
        p.error("--kd-weight needs --teacher")
    if args.teacher:
        args.kd_weight = 0.5 if args.kd_weight is None else args.kd_weight
        if not 0 <= args.kd_weight <= 1:
            p.error("--kd-weight must be in [0, 1]")
    if args.kd_temperature <= 0:
        p.error("--kd-temperature must be > 0")
    if args.eval_temperature < 0 or not 0 < args.eval_top_p <= 1:
        p.error("--eval-temperature must be >= 0 and --eval-top-p in (0, 1]")
    if args.eval_prompts and not args.eval_data:
        p.error("--eval-prompts needs --eval-data")
    if args.lora_rank < 0 or (args.lora_rank and args.init == "scratch"):
        p.error("--lora-rank must be 0 (off) or more, and adapts a pretrained --model, not --init scratch")
    if args.fsdp and (int(os.environ.get("WORLD_SIZE", "1")) < 2 or args.lora_rank):
        p.error("--fsdp shards the model over torchrun's processes: run under torchrun --nproc_per_node N >= 2, "
                "without --lora-rank")
    return args


# ----------------------------------------------------------------------------------------
# data: every example becomes token ids and the index where the trained part starts


def end_token(model, tok, template):
    """The token trained to end a completion, always one sampling stops at: under a chat
    template its end-of-turn token when the model stops on it (<|im_end|>, <|eot_id|>),
    else the tokenizer's end token."""
    eos = models.eos_ids(model, tok)
    if template == "chat" and getattr(tok, "chat_template", None):
        probe = [{"role": "user", "content": "x"}]
        prefix = tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(probe + [{"role": "assistant", "content": "y"}], tokenize=False)
        if full.startswith(prefix + "y"):
            after = tok(full[len(prefix) + 1:], add_special_tokens=False)["input_ids"]
            if after and after[0] in eos:
                return after[0]
    return tok.eos_token_id


def encode_example(ex, tok, template, end_id):
    """One jsonl record -> (ids, start): the tokens are prompt + completion + end token, and
    the loss covers ids[start:]. Plain text has start 0 (its first token has no prediction)."""
    where = ex["_where"]

    def text_of(key):
        if key not in ex:
            raise common.UserError(f"{where}: missing field '{key}'")
        if not isinstance(ex[key], str):
            raise common.UserError(f"{where}: field '{key}' must be a string, not {type(ex[key]).__name__}")
        return ex[key]

    forms = [name for name, keys in [("prompt/completion", ["prompt", "completion"]), ("messages", ["messages"]),
                                     ("text", ["text"])] if any(k in ex for k in keys)]
    if len(forms) != 1:
        raise common.UserError(f"{where}: expected one of 'prompt' and 'completion', 'messages', or 'text'"
                               + (f", not fields of several ({', '.join(forms)})" if forms else ""))
    if forms == ["text"]:
        text = text_of("text")
        if not text.strip():
            raise common.UserError(f"{where}: the text is empty")
        return tok(text)["input_ids"] + [end_id], 0
    if forms == ["messages"]:
        msgs = ex["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise common.UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise common.UserError(f"{where}: messages[{k}] must be {{\"role\": system|user|assistant, "
                                       "\"content\": a string}")
        if msgs[-1]["role"] != "assistant":
            raise common.UserError(f"{where}: the last message must be the assistant's, the one trained on")
        prompt, completion = msgs[:-1], msgs[-1]["content"]
        if [m["role"] for m in prompt] == ["user"]:
            prompt = prompt[0]["content"]  # one question: the same as a prompt/completion pair
        elif not prompt:
            raise common.UserError(f"{where}: 'messages' needs a user turn before the assistant's")
    else:
        prompt, completion = text_of("prompt"), text_of("completion")
    if isinstance(prompt, str) and not prompt.strip():
        raise common.UserError(f"{where}: the prompt is empty")
    if not completion.strip():
        raise common.UserError(f"{where}: the completion is empty")
    try:
        prompt_ids = common.encode_prompt(prompt, tok, template)  # exactly what grpo.py feeds the model
    except common.UserError as e:
        raise common.UserError(f"{where}: {e}") from None
    end = tok.decode([end_id])
    if completion.endswith(end):
        completion = completion[: -len(end)]  # the end token is added once, below
    return prompt_ids + tok(completion, add_special_tokens=False)["input_ids"] + [end_id], len(prompt_ids)


def encode_examples(records, tok, template, max_len, end_id, source):
    """Encode records (from common.read_jsonl) -> (list of (ids, start), counts of what
    --max-len did). source names the file in the error when nothing fits."""
    out, counts = [], {"examples": len(records), "cut": 0, "dropped": 0, "split": 0}
    for ex in records:
        ids, start = encode_example(ex, tok, template, end_id)
        if len(ids) <= max_len:
            out.append((ids, start))
        elif "text" in ex:  # plain text: consecutive pieces (each piece's first token is not predicted)
            counts["split"] += 1
            out += [(ids[s:s + max_len], 0) for s in range(0, len(ids), max_len) if len(ids) - s > 1]
        elif start < max_len:  # cut the completion; there is no end token to learn from it
            counts["cut"] += 1
            out.append((ids[:max_len], start))
        else:
            counts["dropped"] += 1  # the prompt alone fills --max-len
    if not out:
        raise common.UserError(f"{source}: no example fits --max-len {max_len}")
    return out, counts


def epoch_batches(lengths, batch_size, epoch, seed, window):
    """The batches of one epoch (lists of example indices), seeded per epoch.

    With window > 0 examples are sorted by length within each run of window * batch_size
    shuffled examples and cut into batches, and the batches are shuffled: a batch holds
    similar lengths, so padding is small, and the order stays random.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if window:
        span = window * batch_size
        order = [i for s in range(0, len(order), span) for i in sorted(order[s:s + span], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if window:
        rng.shuffle(batches)
    return batches


def collate(examples, pad_id, device):
    """[(ids, start), ...] -> ids, attn, mask, each (B, L), padded on the right.
    mask is 1 on the tokens the loss covers: position >= start, and never position 0."""
    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), L), dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, (seq, start) in enumerate(examples):
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = 1
        mask[i, max(start, 1):len(seq)] = 1
    return ids.to(device), attn.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------
# the loss


def row_losses(logits, target, t_logits=None, kd_temperature=1.0):
    """One sequence: logits (T, V) and target (T,) -> per-token cross-entropy and, given the
    teacher's logits, KL(teacher || student), both (T,), in float32."""
    row = logits.float()
    nll = row.logsumexp(-1) - row.gather(-1, target[:, None]).squeeze(-1)
    if t_logits is None:
        return nll, torch.zeros_like(nll)
    s = torch.log_softmax(row / kd_temperature, -1)
    t = torch.log_softmax(t_logits.float() / kd_temperature, -1)
    # forward KL, sum_v p_t (log p_t - log p_s); times T^2 keeps its gradient's scale (Hinton et al.)
    return nll, (t.exp() * (t - s)).sum(-1) * kd_temperature ** 2


def token_losses(model, ids, attn, mask, teacher=None, kd_temperature=1.0, vocab=None):
    """Per-token cross-entropy and, with a teacher, KL(teacher || student) -> (nll, kl).

    ids, attn, mask: (B, L). Returns two (B, L) tensors, 0 where mask is 0 (kl is None
    without a teacher). Position t's loss is about token t, predicted from the tokens
    before it. Only positions from the earliest trained token on reach the LM head.
    vocab: the tokenizer's size; logits past it (padding some models add to the
    embedding matrix, which differs between sizes of one family) are left out.
    """
    B, L = ids.shape
    first = max(1, int(mask.float().argmax(1).min()))  # the earliest trained position of the batch
    keep = L - first + 1  # logits of positions first-1 .. L-1; the last predicts past the end
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep).logits[:, :-1]
    t_logits = None
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep).logits[:, :-1]
    target, m = ids[:, first:], mask[:, first:].bool()  # (B, L - first)
    nll, kl = torch.zeros(B, L, device=ids.device), torch.zeros(B, L, device=ids.device)
    rows = logits.unbind(0)  # not logits[i]: its backward would write a zeroed copy of all the logits per row
    for i in range(B):
        inputs = (rows[i][:, :vocab], target[i], None if t_logits is None else t_logits[i, :, :vocab], kd_temperature)
        # one row at a time, recomputed in the backward pass: the float32 copies and softmaxes of
        # a (T, V) row are never kept, only the model's own logits (a 150k vocabulary makes each
        # float32 copy of a 4k-token row 2.3 GiB)
        nll_i, kl_i = (checkpoint(row_losses, *inputs, use_reentrant=False) if torch.is_grad_enabled()
                       else row_losses(*inputs))
        nll[i, first:] = torch.where(m[i], nll_i, 0.0)
        kl[i, first:] = torch.where(m[i], kl_i, 0.0)
    return nll, (kl if teacher is not None else None)


def same_vocabulary(a, b):
    """None when two tokenizers give every token the same id, else what differs. (Their end
    tokens may differ, as between a base model and its instruct version: the KL is over ids.)"""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return None
    diff = sorted(set(va.items()) ^ set(vb.items()), key=str)[:3]
    return f"{len(va)} vs {len(vb)} tokens; first differences {diff}"


# ----------------------------------------------------------------------------------------
# the run's pieces, in the order train() uses them: the models, the data, the validation,
# a step's log line


def load_models(args, device, dtype, resumed):
    """The student (float32 master weights: --dtype is for compute), its tokenizer and the
    frozen teacher (None without --teacher) -> (model, tok, teacher); --max-len checked
    against the student's context, its default set. A resumed run takes the student from its
    checkpoint, with LoRA only the adapters. Under FSDP on the CPU until sharded."""
    load_on = torch.device("cpu") if args.fsdp else device
    if args.init == "scratch" and not resumed:
        tok = models.build_tiny_tokenizer() if not args.tokenizer else models.load_tokenizer(args.tokenizer)
        model = models.new_model(tok, args.hidden, args.layers, args.heads, args.kv_heads, args.mlp,
                                 args.context, args.seed).to(load_on)
    else:
        model, tok = models.load_for_training(args.model, load_on, resumed, args.lora_rank, args.lora_alpha)
    context = getattr(model.config, "max_position_embeddings", None)
    if args.max_len is None:
        args.max_len = min(context or 4096, 4096)
    elif context and args.max_len > context:  # said before a teacher is loaded
        raise common.UserError(f"--max-len {args.max_len} is longer than the model's context of {context} tokens")
    teacher = None
    if args.teacher:
        # frozen, so its weights are kept in the compute dtype: half the memory in bf16, at the price of
        # a small KL rather than exactly 0 between identical weights (their arithmetic differs)
        teacher, t_tok = models.load_model(args.teacher, load_on, dtype)
        teacher.eval().requires_grad_(False)
        differs = same_vocabulary(tok, t_tok)
        if differs:
            raise common.UserError(
                f"--teacher {args.teacher}: its tokenizer differs from the student's ({differs}). Logit "
                "distillation compares the two next-token distributions token by token, so it needs one "
                "vocabulary. Distil at the sequence level instead: sample the teacher with reject_sample.py "
                "and fine-tune on the kept text without --teacher.")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    common.print0(f"{'new' if args.init == 'scratch' and not resumed else 'loaded'} model: {n_params / 1e6:.2f}M "
                  f"parameters ({n_train / 1e6:.2f}M trained), vocabulary {len(tok)}, on {device} in "
                  f"{str(dtype).removeprefix('torch.')}")
    return model, tok, teacher


def load_data(args, tok, end_id):
    """The training and validation sets, encoded -> (train set, its counts, validation set, its
    counts). Without --val-data the split is by record, so no document lands on both sides."""
    records = common.read_jsonl(args.data, required=())
    val_records = common.read_jsonl(args.val_data, required=()) if args.val_data else []
    if not args.val_data:
        n_val = round(args.val_fraction * len(records))
        if n_val >= len(records):
            raise common.UserError(f"--val-fraction {args.val_fraction} leaves no training example")
        if args.val_fraction and not n_val:
            common.print0(f"note: --val-fraction {args.val_fraction} of {len(records)} examples holds out none: "
                          "no validation loss")
        order = np.random.default_rng(args.seed).permutation(len(records)).tolist()
        val_records = [records[i] for i in order[:n_val]]
        records = [records[i] for i in sorted(order[n_val:])]
    train_set, counts = encode_examples(records, tok, args.template, args.max_len, end_id, args.data)
    val_set, val_counts = (encode_examples(val_records, tok, args.template, args.max_len, end_id,
                                           args.val_data or args.data) if val_records else ([], None))
    lengths = [len(ids) for ids, _ in train_set]
    common.print0(f"{args.data}: {counts['examples']} examples for training ({len(train_set)} sequences, "
                  f"{sum(lengths)} tokens, the longest {max(lengths)}), {len(val_records)} for validation"
                  + (f" (from {args.val_data})" if args.val_data else ""))
    for name, c in [("training", counts), ("validation", val_counts)]:
        if c and (c["cut"] or c["dropped"] or c["split"]):
            common.print0(f"--max-len {args.max_len}, {name}: {c['cut']} completions cut (no end token learnt from "
                          f"them), {c['dropped']} examples dropped (the prompt alone fills it), {c['split']} texts split")
            if c["cut"] + c["dropped"] > 0.1 * c["examples"]:
                common.warn0(f"warning: over 10% of the {name} examples are longer than --max-len {args.max_len}; "
                              "raise it")
    return train_set, counts, val_set, val_counts


def validation_loss(model, val_set, pad_id, micro_batch_size, vocab, device):
    """Mean cross-entropy per trained token of the held-out examples, longest first."""
    total, n = 0.0, 0
    val_lengths = [len(ids) for ids, _ in val_set]
    order = sorted(range(len(val_set)), key=lambda i: -val_lengths[i])
    with torch.no_grad():
        for s in range(0, len(order), micro_batch_size):
            ids, attn, mask = collate([val_set[i] for i in order[s:s + micro_batch_size]], pad_id, device)
            nll, _ = token_losses(model, ids, attn, mask, vocab=vocab)
            total, n = total + nll.sum().item(), n + int(mask.sum())
    return total / n


def log_line(record, num_steps, gnorm):
    """The step's one line, its keys always in this order (kd only with --teacher)."""
    line = (f"step {record['step']}/{num_steps} | epoch {record['epoch']:.2f} | loss {record['loss']:.4f}"
            f" | ce {record['ce']:.4f}")
    line += f" | kd {record['kd']:.4f}" if "kd" in record else ""
    return line + (f" | tokens {record['tokens']} | pad {record['pad']:.2f} | gnorm {gnorm:.3f}"
                   f" | lr {record['lr']:.1e} | {record['tok/s']:.0f} tok/s | {record['s']:.2f}s")


# ----------------------------------------------------------------------------------------
# training: each step is one batch's forward and backward passes in micro-batches, an
# optimizer step and a log line; then evaluation and a checkpoint on their cadence


def train(args, stop=None):
    # stop: what a signal asked (common.stop_signals): "at" once the run should stop at a step's end
    stop = {} if stop is None else stop
    # torchrun: each process takes a share of every batch, gradients are summed, process 0 writes
    rank, world, device, dtype = common.start_run(args)

    # models and data; a resumed run takes the student (and all else) from its checkpoint
    resumed, state = checkpoints.resume_from(args.out, args.resume, vars(args), RESUME_CHECKED)
    model, tok, teacher = load_models(args, device, dtype, resumed)
    vocab, context = len(tok), getattr(model.config, "max_position_embeddings", None)
    train_set, counts, val_set, val_counts = load_data(args, tok, end_token(model, tok, args.template))
    eval_examples, eval_ids = (common.load_prompts(args.eval_data, tok, args.template, ["answer"], args.eval_prompts)
                               if args.eval_data else ([], []))
    args.max_new_tokens = common.fit_max_new_tokens(args.max_new_tokens, context, eval_examples, eval_ids)
    lengths = [len(ids) for ids, _ in train_set]
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    num_steps = args.num_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    common.check_not_finished(state, num_steps, resumed)
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(0.03 * num_steps)
    common.print0(f"{num_steps} steps of {args.batch_size} examples ({num_steps / steps_per_epoch:.2f} epochs), "
                  f"{math.ceil(args.batch_size / args.micro_batch_size)} micro-batches of {args.micro_batch_size}, "
                  f"warm-up {warmup} steps, cosine to {args.min_lr_ratio:g} x {args.lr:g}")
    if args.grad_checkpointing:
        models.enable_grad_checkpointing(model)
    if args.fsdp:  # each process keeps 1/N of the weights, gradients and AdamW state, and of the teacher
        model = distributed.shard(model, device)
        teacher = distributed.shard(teacher, device, keep_gathered=False) if teacher is not None else None
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # sampled evaluation only
    eos = models.eos_ids(model, tok)
    start = 0
    if state:
        start = checkpoints.restore_training(model, opt, state, resumed, world, args.weight_decay, args.out,
                                             ["metrics.jsonl"])

    amp = functools.partial(common.autocast, device, dtype)  # with amp(): compute in --dtype
    flags = vars(args)
    log, finish = common.open_run(args.out, flags, args.wandb_project, {"data": counts, "val_data": val_counts}, rank)

    def run_eval(step):  # on process 0 alone; under FSDP every process takes part in the passes
        if rank and not args.fsdp:
            return
        model.eval()
        record = {"step": step}
        if val_set:
            with amp():
                record["val_loss"] = validation_loss(model, val_set, tok.pad_token_id, args.micro_batch_size, vocab,
                                                     device)
            common.print0(f"val step {step} | loss {record['val_loss']:.4f} | ppl "
                          f"{math.exp(min(record['val_loss'], 50)):.2f}")
        if eval_examples:
            with amp():
                record.update(sampling.evaluate(model, tok, eval_examples, eval_ids, eos, generator, args.eval_samples,
                                                args.max_new_tokens, args.eval_temperature, args.eval_top_p,
                                                args.micro_batch_size, warn=common.warn0,
                                                score=R.scorer("accuracy,format")))
            common.print0(sampling.eval_line(step, record))
        model.train()
        if len(record) > 1:
            log(step, record)

    if not start:
        run_eval(0)
    if state:  # last: nothing above may draw from the random streams the next step continues
        checkpoints.set_rng_state(state["rng"][rank], [generator])
    history, bad_steps, stopping = [], 0, False
    batches, epoch = [], -1  # the data order is a function of the step: nothing to restore
    stop["armed"] = True  # from here a signal stops the run at the end of a step, with a checkpoint
    for step in common.progress(range(start + 1, num_steps + 1), desc="sft", initial=start, total=num_steps):
        t0 = common.clock(device)
        if (step - 1) // steps_per_epoch != epoch:  # a new epoch: a new seeded order
            epoch = (step - 1) // steps_per_epoch
            batches = epoch_batches(lengths, args.batch_size, epoch, args.seed, args.group_by_length)
        batch = batches[(step - 1) % steps_per_epoch][rank::world]  # this process's share
        if args.group_by_length:  # longest first: the micro-batches hold similar lengths and pad little
            batch = sorted(batch, key=lambda i: -lengths[i])
        lr = common.lr_at(step, num_steps, args.lr, warmup, args.min_lr_ratio)
        for pg in opt.param_groups:
            pg["lr"] = lr

        # forward/backward over micro-batches; each adds its share of the batch's mean per token,
        # so the gradient (summed over processes too) is the whole batch's however it is split
        micro = [collate([train_set[i] for i in batch[s:s + args.micro_batch_size]], tok.pad_token_id, device)
                 for s in range(0, len(batch), args.micro_batch_size)]  # (ids, attn, mask), each (b, L)
        n_total = int(distributed.all_sum([sum(int(mask.sum()) for _, _, mask in micro)], device)[0])  # trained tokens
        n_real, n_padded = sum(int(attn.sum()) for _, attn, _ in micro), sum(attn.numel() for _, attn, _ in micro)
        if args.fsdp:  # FSDP's gathers need every process in every pass: the short ones pass over nothing
            ids, attn, mask = collate([train_set[0]], tok.pad_token_id, device)
            micro += [(ids, attn, mask * 0)] * (int(max(distributed.all_gather([len(micro)]))) - len(micro))
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
        opt.zero_grad(set_to_none=True)
        for ids, attn, mask in micro:
            with amp():
                nll, kl = token_losses(model, ids, attn, mask, teacher, args.kd_temperature, vocab)  # (b, L) each
            ce, kd = nll.sum() / n_total, (kl.sum() / n_total if kl is not None else None)
            loss = ce if kd is None else (1 - args.kd_weight) * ce + args.kd_weight * kd
            loss.backward()
            sums["loss"] += loss.item()
            sums["ce"] += ce.item()
            sums["kd"] += kd.item() if kd is not None else 0.0
        gnorm = common.optimizer_step(model, opt, args.grad_clip, step)  # summed over processes, clipped
        bad_steps = 0 if math.isfinite(gnorm) else bad_steps + 1
        *totals, n_real, n_padded = distributed.all_sum([*sums.values(), n_real, n_padded], device)
        sums = dict(zip(sums, totals))
        seconds = common.clock(device) - t0

        # log: one line, one jsonl record
        record = {"step": step, "epoch": step / steps_per_epoch, "loss": sums["loss"], "ce": sums["ce"]}
        if teacher is not None:
            record["kd"] = sums["kd"]
        record.update({"tokens": n_total, "pad": 1 - n_real / n_padded,
                       "gnorm": gnorm if math.isfinite(gnorm) else None, "lr": lr,
                       "tok/s": n_real / seconds, "s": seconds})
        common.print0(log_line(record, num_steps, gnorm))
        log(step, record)
        history.append(record)
        common.stop_if_bad(bad_steps, args.max_bad_steps)

        # evaluate and save on their cadence, and at the end, or when a signal asked to stop
        last = step == num_steps
        stopping = not last and distributed.all_sum([float("at" in stop)], device)[0] > 0  # all stop at one step
        if last or (args.eval_every and step % args.eval_every == 0):
            run_eval(step)
        if (args.save_every and step % args.save_every == 0) or last or stopping:
            path = checkpoints.save_training_checkpoint(args.out, step, model, opt, tok, flags, {}, [generator],
                                                        args.save_total_limit, rank, args.save_optimizer)
        if stopping:
            common.stopped(step, path, flags)
            break
    finish()
    distributed.end_distributed()
    if stopping:
        sys.exit(130)  # not 0: whatever runs after this command must not take the run for finished
    return history


def main(argv=None):
    args = get_args(argv)
    with common.user_errors(), common.stop_signals() as stop:
        return train(args, stop)


if __name__ == "__main__":
    main()
