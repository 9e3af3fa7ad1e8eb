"""Shared pieces of nanoR1: only what two or more scripts need.

Loading models and tokenizers (local folder, hub id or short name), building a tiny
Qwen2-shaped model with a locally trained tokenizer, prompt formatting and encoding,
batched sampling with a KV cache, scoring samples and evaluating pass@1, per-token
log-probs, jsonl reading, device/dtype choice, a run's logs, atomic checkpoints and what
exact resume needs, the few collectives of several processes (torchrun), LoRA (peft) and
FSDP2 sharding. The algorithms themselves (advantages, losses, loops) live in the scripts.
"""

import contextlib
import functools
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import rewards as R

# ----------------------------------------------------------------------------------------
# errors: one clear message, caught by each script's main() and printed without a traceback


class UserError(Exception):
    """Bad input from the user (a model, a file, a line, a flag); the message says which."""


# ----------------------------------------------------------------------------------------
# device and dtype, decided in one place


def pick_device(name="auto"):
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            raise UserError(f"--device {name}: no such CUDA device on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device_name, backend=None, timeout_hours=2.0):
    """Join torchrun's process group when there is one -> (rank, world, device).

    One process is world 1 through the same code, with no process group. Under torchrun,
    process r takes GPU LOCAL_RANK when the device is CUDA. backend: None = nccl for CUDA
    tensors, gloo on CPU (gloo alone is enough for Python objects).
    """
    import datetime

    import torch.distributed as dist

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(device_name)
    if world > 1 and device.type == "cuda" and device_name not in ("auto", "cuda"):
        raise UserError(f"--device {device_name}: under torchrun each process takes GPU LOCAL_RANK; "
                        "use --device cuda (or auto)")
    if world > 1 and device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started process {local_rank} on a machine with "
                            f"{torch.cuda.device_count()} GPUs: use --nproc_per_node {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                timeout=datetime.timedelta(hours=timeout_hours))
    return rank, world, device


def end_distributed():
    """Leave the process group, once every process is done (a process that left while
    another still wrote its checkpoint would abort it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(values, device):
    """Element-wise sums of a list of numbers over every process (the numbers themselves in
    one process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(items):
    """Every process's list, concatenated in rank order (the list itself in one process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def sum_gradients(model):
    """Sum each parameter's gradient over the processes; a process without samples adds zeros.
    (An FSDP model's backward pass has already summed them, each process keeping its shard.)"""
    import torch.distributed as dist

    if not dist.is_initialized() or is_sharded(model):
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def pick_dtype(name, device):
    """The compute dtype: bf16 on CUDA (when supported), fp32 elsewhere, unless the flag says."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device, dtype):
    """Mixed precision: weights stay float32, matmuls run in `dtype`; nothing at float32.

    Weights trained in bf16 lose small updates: at lr 1e-6 an update is far below bf16's
    resolution (about 0.4% of a weight), so AdamW would leave them unchanged.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------
# loading models: a local folder, a hub id ("Qwen/Qwen2.5-0.5B") or a short name

# short-name prefix -> hub organisation (matched case-insensitively on the name's start)
HUB_ORGS = [
    ("deepseek-r1-distill-", "deepseek-ai"),
    ("qwen", "Qwen"),  # Qwen2-, Qwen2.5-, Qwen3-, QwQ- is below
    ("qwq-", "Qwen"),
    ("meta-llama-", "meta-llama"),
    ("llama-", "meta-llama"),
    ("smollm", "HuggingFaceTB"),
]


def model_candidates(name):
    """Where a model name may live, in the order they are tried: [(kind, where), ...]."""
    if os.path.isdir(name) or name.startswith((".", "/", "~")):
        return [("local folder", os.path.expanduser(name))]
    if "/" in name:
        return [("hub id", name)]
    for prefix, org in HUB_ORGS:
        if name.lower().startswith(prefix):
            return [("hub id", f"{org}/{name}")]
    return [("hub id", name)]  # an id without an organisation, like "gpt2"


def load_model(name, device=torch.device("cpu"), dtype=torch.float32, tokenizer=True):
    """Load (model, tokenizer) from a local folder, a hub id or a short name.

    Raises UserError saying everything that was tried when nothing loads: offline, the hub
    client's own stack trace would hide the one fact that matters (the name was not found).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    tried = []
    for kind, where in model_candidates(name):
        if kind == "local folder" and not os.path.isdir(where):
            tried.append(f"{kind} '{where}' (does not exist)")
            continue
        # the local cache first (instant, and it works offline), then the hub, which retries
        for local_only in [True] if offline or kind == "local folder" else [True, False]:
            try:
                model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=local_only)
                tok = AutoTokenizer.from_pretrained(where, local_files_only=local_only) if tokenizer else None
            except Exception as e:  # the hub client raises many types; all mean "not here"
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                continue
            if tok is not None and tok.pad_token_id is None:
                tok.pad_token = tok.eos_token  # base Llama tokenizers ship without a pad token
            for m in model.modules():  # RL compares log-probs of the same weights: dropout would add noise
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            return model.to(device), tok
        tried.append(f"{kind} '{where}' ({reason[:200]})")
    hint = " (HF_HUB_OFFLINE=1: only the local cache was searched)" if offline else ""
    raise UserError(f"could not load model '{name}'{hint}; tried: " + "; ".join(tried))


def eos_ids(model, tok):
    """All token ids that end a completion: the tokenizer's eos and the generation config's."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    if not ids:
        raise UserError("the tokenizer has no eos token: completions could never end")
    return sorted(ids)


# ----------------------------------------------------------------------------------------
# a tiny model and tokenizer built offline, in seconds, for tests and the CPU pipeline

# Qwen2's pre-tokenizer split (digits one by one, words, punctuation runs, whitespace).
# transformers 5 rebuilds a Qwen2 tokenizer from vocab + merges with exactly this split,
# so we train with it too; otherwise the reloaded tokenizer would disagree with ours.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
EOS, PAD = "<|endoftext|>", "<|pad|>"


def tiny_corpus():
    """A little text covering what the tiny tokenizer must handle well (merges come from it)."""
    words = ("the answer is so we get carry add subtract multiply divide sum total then "
             "first next step result check digit number question user assistant think "
             "reasoning process solve compute equals because therefore").split()
    lines = []
    for i in range(200):
        a, b = 37 * i % 1000, 91 * i % 997
        lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. {a} - {b} = {a - b}.")
        lines.append(" ".join(words[(i + k) % len(words)] for k in range(8)) + ".")
    lines.append(r"\boxed{12} \frac{1}{2} (x + y)^2 = x^2 + 2xy + y^2 % $ # , ; : ! ?")
    return lines


def build_tiny_tokenizer(vocab_size=384):
    """Train a byte-level BPE in Qwen2's layout with the `tokenizers` package; no download.

    Every byte is in the alphabet, so any text round-trips; the R1 tags are single tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(tiny_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)
    tok.add_tokens(TAGS)  # normal (not special) tokens: they must survive decoding
    return tok


def new_model(tok, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, max_positions=1024, seed=0, vocab=None):
    """A freshly initialised Qwen2 model sized by the arguments, for the tokenizer `tok` (its
    vocabulary, or `vocab` entries when larger: a real model's LM head on the tiny tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden % heads or heads % kv_heads:
        raise UserError(f"a model of hidden size {hidden} with {heads} query and {kv_heads} key/value heads: "
                        "hidden must be a multiple of the heads, and the heads of the key/value heads")
    config = Qwen2Config(
        vocab_size=max(vocab or 0, len(tok)), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def build_tiny_model(out_dir, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128,
                     max_positions=1024, seed=0, tokenizer_dir=None):
    """Write a freshly initialised Qwen2 model and the tiny tokenizer to out_dir.

    Saved with save_pretrained and meant to be reloaded with load_model(out_dir), like any
    real model. With tokenizer_dir the tokenizer is copied from there (a student that must
    share its teacher's vocabulary).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tiny_tokenizer()
    model = new_model(tok, hidden, layers, heads, kv_heads, mlp, max_positions, seed)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------
# prompt formatting

# DeepSeek-R1-Zero's template (Table 1 of the R1 paper) for base models.
R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt} Assistant:"
)


def format_prompt(prompt, tok, template="r1"):
    """The text the model is given: R1-Zero template, the tokenizer's chat template, or raw.
    `prompt` is the user's text, or (chat template only) a list of chat messages that ends
    before the assistant's turn.

    Some chat templates (DeepSeek-R1-Distill, Qwen3) end the prompt with an opened
    `<think>`; the completion would then never contain it and the format reward would
    score every sample 0. We cut it off so the model writes the tag itself.
    """
    if not isinstance(prompt, str) and template != "chat":
        raise UserError(f"--template {template}: a conversation of several turns needs --template chat")
    if template == "r1":
        prompt = prompt.strip()
        text = R1_TEMPLATE.format(prompt=prompt if prompt[-1:] in ".?!" else prompt + ".")
    elif template == "chat":
        if not getattr(tok, "chat_template", None):
            raise UserError("--template chat: this tokenizer has no chat template; use r1 or raw")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    elif template == "raw":
        text = prompt
    else:
        raise UserError(f"--template {template}: expected r1, chat or raw")
    stripped = text.rstrip()
    if stripped.endswith("<think>") and stripped.count("<think>") > stripped.count("</think>"):
        text = stripped[: -len("<think>")]
    return text


def encode_prompt(prompt, tok, template="r1"):
    """Token ids of the formatted prompt: the one encoding every script uses, so a model
    fine-tuned by sft.py sees at RL and evaluation time exactly the tokens it was trained on."""
    text = format_prompt(prompt, tok, template)
    # chat templates already contain the model's begin-of-text token
    return tok(text, add_special_tokens=template != "chat")["input_ids"]


# ----------------------------------------------------------------------------------------
# sampling: G completions per prompt with a KV cache


def left_pad(seqs, pad_id, device):
    """List of token-id lists -> (ids, mask), both (B, L), padded on the left."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s):] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits, temperature, top_p, generator=None, u=None):
    """One token per row from (N, V) logits: greedy at temperature 0, else nucleus sampling.
    u: (N,) uniform numbers in [0, 1) to sample with; drawn from `generator` when None."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already cover top_p (keeps at least one)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # inverse-CDF sampling: the first token whose cumulative probability exceeds u. It takes one
    # random number a row, where torch.multinomial draws one for every vocabulary entry; a token
    # of probability 0 is never taken (its cumulative probability equals its predecessor's)
    if u is None:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    cdf = probs.cumsum(-1)  # (N, V)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return token.clamp_(max=probs.shape[-1] - 1)  # u * total rounded up to the total


@functools.cache
def roomy_layer():
    """A Hugging Face DynamicLayer (one layer's KV cache) that keeps room ahead: a decoding
    step writes its keys and values into the room instead of concatenating, which copies the
    whole cache, every layer, every token (a fifth of the sampling time of a small model on
    a CPU). When the cache's rows change (a finished row dropped) the old buffer goes, and
    the next step copies what is left into a new one, long enough for `end` tokens."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        end = 0  # the longest the cache gets: prompt + completion

        def batch_select_indices(self, indices):
            self.buf = None  # freed now, not after every layer has its kept rows copied
            super().batch_select_indices(indices)

        def update(self, key_states, value_states, *args, **kwargs):
            n, k = self.keys.shape[-2], key_states.shape[-2]
            buf = getattr(self, "buf", None)
            if buf is None or buf[0].data_ptr() != self.keys.data_ptr() or buf[0].shape[-2] < n + k:
                shape = (*self.keys.shape[:-2], max(n + k, self.end), self.keys.shape[-1])
                buf = self.buf = (self.keys.new_empty(shape), self.values.new_empty(shape))
                buf[0][..., :n, :], buf[1][..., :n, :] = self.keys, self.values
            buf[0][..., n:n + k, :], buf[1][..., n:n + k, :] = key_states, value_states
            self.keys, self.values = buf[0][..., :n + k, :], buf[1][..., :n + k, :]  # views
            return self.keys, self.values

    return RoomyLayer


def sample(model, prompts, group, max_new_tokens, eos, pad_id, temperature=1.0, top_p=1.0,
           generator=None):
    """Sample `group` completions for each prompt (lists of token ids), prompt-major order.

    The prompt is encoded once and its KV cache repeated G times. A completion that ends
    leaves the batch (its rows of the cache are dropped), so the forward passes cost only
    what is still being sampled. Each row draws its random numbers from its own place in
    the stream, so what a row samples does not depend on when the others end. Returns:
      ids   (P*G, T) completion tokens, pad after the end token
      mask  (P*G, T) 1 on completion tokens up to and including the end token
      truncated (P*G,) True when the limit was hit without an end token
    """
    device = next(model.parameters()).device
    # under FSDP every process takes part in every forward pass (each gathers the layers'
    # shards from all), so finished rows stay in the batch and the processes stop together;
    # and weights gathered under inference mode could not be used by the next backward pass
    sync = is_sharded(model)
    was_training = model.training
    model.eval()
    with torch.no_grad() if sync else torch.inference_mode():
        prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (P, Lp)
        pos = prompt_mask.cumsum(-1) - 1  # positions ignore the left padding
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                    position_ids=pos.clamp(min=0), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(group)  # (P, ...) -> (P*G, ...): the prompt is encoded once
        layers = getattr(cache, "layers", [])
        plain = bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)  # full attention
        for layer in layers:  # plain layers get room for the completion
            if type(layer).__name__ == "DynamicLayer" and layer.is_initialized:
                layer.__class__, layer.end = roomy_layer(), layer.keys.shape[-2] + max_new_tokens
        logits = out.logits[:, -1].repeat_interleave(group, dim=0)  # (n, V), n rows still in the batch
        N, Lp = logits.shape[0], prompt_ids.shape[1]
        attn = torch.cat([prompt_mask.repeat_interleave(group, dim=0),  # (n, Lp + T), sliced as it grows
                          torch.ones(N, max_new_tokens, dtype=prompt_mask.dtype, device=device)], dim=1)
        if plain and getattr(model.config, "_attn_implementation", None) == "sdpa":  # the default attention
            # a step's one query sees its row's every position but the left padding: made once as
            # SDPA's 4D mask and sliced, where Hugging Face would build it again for every token
            # (not with sliding-window layers, whose caches keep only the window)
            attn = attn.bool()[:, None, None, :]  # (n, 1, 1, Lp + T)
        next_pos = pos[:, -1:].repeat_interleave(group, dim=0) + 1  # (n, 1)
        eos_t = torch.tensor(eos, device=device, dtype=torch.long)
        ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (N, T)
        mask = torch.zeros((N, max_new_tokens), dtype=torch.long, device=device)  # (N, T)
        done = torch.zeros(N, dtype=torch.bool, device=device)  # (N,)
        rows = torch.arange(N, device=device)  # (n,) which of the N completions each batch row is
        for t in range(max_new_tokens):
            u = torch.rand(N, generator=generator, device=device)[rows] if temperature else None
            tok = sample_next(logits, temperature, top_p, generator, u)  # (n,)
            live = ~done[rows]  # (n,) all of them, but under FSDP
            ids[rows, t] = torch.where(live, tok, pad_id)
            mask[rows, t] = live.long()
            ended = live & torch.isin(tok, eos_t)  # (n,) the rows this token ends
            changed = bool(eos) and bool(ended.any())  # one check a token, none when nothing can end
            done[rows] |= ended
            finished = (changed or sync) and bool(done.all())
            if sync:
                finished = all_sum([float(finished)], device)[0] == torch.distributed.get_world_size()
            if finished or t == max_new_tokens - 1:  # no forward pass whose logits go unused
                break
            if changed and not sync:  # finished rows leave the batch
                keep = (~ended).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, tok, attn, next_pos = rows[keep], tok[keep], attn[keep], next_pos[keep]
            out = model(input_ids=tok[:, None], attention_mask=attn[..., :Lp + t + 1], position_ids=next_pos,
                        past_key_values=cache, use_cache=True)
            cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    model.train(was_training)
    return {"ids": ids[:, :t + 1], "mask": mask[:, :t + 1], "truncated": ~done}  # (N, T'): T' the longest


def rollout(model, tok, examples, prompt_ids, group, max_new_tokens, temperature, top_p,
            eos, rewards, generator, defaults, warn=print, timings=None):
    """Sample `group` completions per example and score them -> list of per-completion dicts.

    rewards: the list R.parse_rewards returns. defaults: fields the rewards fall back on
    when an example lacks them (the language, the overlong buffer). timings: a dict whose
    "sample" and "score" entries get the seconds each took added.
    """
    t0 = time.time()
    out = sample(model, prompt_ids, group, max_new_tokens, eos, tok.pad_token_id,
                 temperature, top_p, generator)
    lengths = out["mask"].sum(1).tolist()  # (waits for the GPU)
    t1 = time.time()
    ids, truncated = out["ids"].tolist(), out["truncated"].tolist()
    completions = [ids[i][: lengths[i]] for i in range(len(ids))]
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    # the length rules see the completion's length in tokens beside the example's fields
    contexts = [{**defaults, **examples[i // group], "num_tokens": lengths[i], "max_tokens": max_new_tokens}
                for i in range(len(ids))]
    rows = []
    for i, (total, parts, errors) in enumerate(R.score_many(texts, contexts, rewards)):  # in parallel
        ex = examples[i // group]
        for e in errors:
            warn(f"warning: {ex.get('_where', '?')}: {e}")
        rows.append({"prompt": prompt_ids[i // group], "completion": completions[i], "text": texts[i],
                     "truncated": truncated[i], "reward": total, "parts": parts, "example": ex})
    if timings is not None:
        timings["sample"] += t1 - t0
        timings["score"] += time.time() - t1
    return rows


def evaluate(model, tok, examples, prompt_ids, eos, generator, num_samples, max_new_tokens,
             temperature=0.6, top_p=0.95, prompts_per_batch=8, defaults=None, warn=print):
    """pass@1 averaged over `num_samples` samples per prompt (R1's protocol: temperature 0.6,
    top-p 0.95), with the format rate, the truncation rate and the mean length in tokens."""
    acc = fmt = length = trunc = 0.0
    checks = R.parse_rewards("accuracy,format")
    for s in range(0, len(examples), prompts_per_batch):
        rows = rollout(model, tok, examples[s:s + prompts_per_batch], prompt_ids[s:s + prompts_per_batch],
                       num_samples, max_new_tokens, temperature, top_p, eos, checks, generator,
                       defaults or {}, warn)
        for r in rows:
            acc, fmt = acc + r["parts"]["accuracy"], fmt + r["parts"]["format"]
            length, trunc = length + len(r["completion"]), trunc + r["truncated"]
    n = len(examples) * num_samples
    return {"eval_pass@1": acc / n, "eval_format": fmt / n, "eval_len": length / n, "eval_trunc": trunc / n}


# ----------------------------------------------------------------------------------------
# per-token log-probs of completion tokens


def pad_batch(prompts, completions, pad_id, device):
    """Token-id lists -> prompt_ids, prompt_mask (B, Lp) padded on the left and
    ids, mask (B, T) padded on the right: each micro-batch is padded only to its own lengths."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    T = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), T), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = 1
    return prompt_ids, prompt_mask, ids.to(device), mask.to(device)


LOGIT_CHUNK = 2**24  # float32 entries of the logits turned into log-probs at once (64 MiB)


def completion_logprobs(model, prompt_ids, prompt_mask, ids, mask, temperature=1.0,
                        with_entropy=False):
    """Log-probs (B, T) of completion tokens `ids` given left-padded prompts, in one forward.

    Logits are divided by the sampling temperature so that the probabilities are those of
    the distribution that was sampled. Only the T completion positions reach the LM head.
    Log-softmax runs on chunks of whole sequences, about LOGIT_CHUNK entries each (one
    sequence at least), and is recomputed in the backward pass: at most one chunk's float32
    copy of the logits exists at a time, in the forward and in the backward pass, beside
    the model's own logits. Padding positions get 0. Gradients flow unless the caller is
    under torch.no_grad(). Returns logp, or (logp, entropy) with with_entropy.
    """
    from torch.utils.checkpoint import checkpoint

    B, T = ids.shape
    input_ids = torch.cat([prompt_ids, ids], dim=1)  # (B, Lp + T)
    attn = torch.cat([prompt_mask, mask], dim=1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding takes no positions
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos,
                   use_cache=False, logits_to_keep=T + 1).logits[:, :-1]  # (B, T, V)

    def chunk_logp(x, target):  # (b, T, V), (b, T) -> (b, T)
        x = x.float() / temperature
        return x.gather(-1, target[..., None]).squeeze(-1) - x.logsumexp(-1)

    rows = max(1, LOGIT_CHUNK // (T * logits.shape[-1]))  # sequences per chunk
    logps, ents = [], []
    for x, target in zip(logits.split(rows), ids.split(rows)):  # split, not x[i]: no full-size zeros per backward
        grad = torch.is_grad_enabled() and x.requires_grad
        logps.append(checkpoint(chunk_logp, x, target, use_reentrant=False) if grad else chunk_logp(x, target))
        if with_entropy:
            with torch.no_grad():
                z = x.float() / temperature
                ents.append(z.logsumexp(-1) - (torch.softmax(z, -1) * z).sum(-1))
    logp = torch.cat(logps).masked_fill(mask == 0, 0.0)
    if not with_entropy:
        return logp
    return logp, torch.cat(ents).masked_fill(mask == 0, 0.0)


# ----------------------------------------------------------------------------------------
# data


def read_jsonl(path, required=("prompt",)):
    """Read a jsonl file into a list of dicts; errors name the file and line.

    Each record gets "_where" = "file:line" so later errors can point at it.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if key not in row:
                    raise UserError(f"{path}:{n}: missing field '{key}'")
                if isinstance(row[key], (int, float)) and not isinstance(row[key], bool):
                    row[key] = str(row[key])  # an answer written as a number: 72 -> "72"
                if not isinstance(row[key], str):
                    raise UserError(f"{path}:{n}: field '{key}' must be a string, not {type(row[key]).__name__}")
            row["_where"] = f"{path}:{n}"
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def load_prompts(path, tok, template, max_new_tokens, context, need=()):
    """Read a jsonl file of prompts and encode them -> (examples, prompt ids); a prompt that
    cannot fit the model's context with max_new_tokens after it is an error naming its line.
    need: fields besides "prompt" every line must have (the rewards' "answer", "tests")."""
    if context and max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context} tokens")
    examples = read_jsonl(path, required=("prompt", *need))
    ids = []
    for ex in examples:
        ids.append(encode_prompt(ex["prompt"], tok, template))
        if not ids[-1]:
            raise UserError(f"{ex['_where']}: the prompt is empty")
        if context and len(ids[-1]) + max_new_tokens > context:
            raise UserError(f"{ex['_where']}: the prompt is {len(ids[-1])} tokens; with --max-new-tokens "
                            f"{max_new_tokens} it does not fit the model's context of {context} tokens")
    return examples, ids


def append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------
# a run's set-up: seeds, memory, and the output folder's logs


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_grad_checkpointing(model):
    """Recompute activations in the backward pass; the method's name changed within transformers 5."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


# ----------------------------------------------------------------------------------------
# models whose training state does not fit: LoRA (peft, optional) and FSDP2


def add_lora(model, rank, alpha, adapter=None):
    """Freeze `model` and add LoRA adapters of rank `rank` (scale alpha / rank) to every
    linear layer but the LM head -> the peft model, whose adapters alone train. `adapter`:
    a saved adapter folder to go on from (--resume). The adapters start at zero, so the
    base with the adapters disabled is the initial policy: the reference, at no memory."""
    try:
        import peft  # optional dependency, imported only for --lora-rank
    except ImportError:
        raise UserError("--lora-rank: peft is not installed (pip install peft)") from None
    if adapter:
        if not os.path.isdir(adapter):
            raise UserError(f"--resume: no {adapter} (the checkpoint was written without --lora-rank)")
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
        saved = model.peft_config["default"]
        if (saved.r, saved.lora_alpha) != (rank, alpha):
            raise UserError(f"--resume: the adapters in {adapter} have rank {saved.r} and alpha {saved.lora_alpha:g}, "
                            f"not --lora-rank {rank} --lora-alpha {alpha:g}")
        return model
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(model, config)


def is_lora(model):
    return hasattr(model, "peft_config")


def merged_state_dict(model):
    """A LoRA model's weights with the adapters merged in (W + alpha/r * B A), under the base
    model's own names. The model is left as it is: merging in place and back would round
    the base weights, and the next step would not be the uninterrupted run's."""
    base = model.get_base_model()
    weights = {name.replace(".base_layer.", "."): t for name, t in base.state_dict().items() if ".lora_" not in name}
    with torch.no_grad():  # one merged matrix at a time on the device, then to the CPU
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                weights[f"{name}.weight"] = (module.base_layer.weight + module.get_delta_weight("default")).cpu()
    return weights


def shard(model, device, keep_gathered=True):
    """FSDP2: split the parameters (and their gradients and AdamW state) of every decoder
    layer, and of the rest, evenly over the processes. A layer's whole weights are gathered
    for its forward and backward and freed after. Gradients are summed, not averaged: the
    losses are already weighted by the whole step's counts. keep_gathered: the weights
    outside the layers (embeddings, head) stay whole from a forward to the next backward,
    so sampling does not gather them again for every token. Returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    layers = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]
    if not layers:  # the whole model would be gathered at once: no memory saved
        raise UserError(f"--fsdp: {type(model).__name__} names no layer class to shard by (_no_split_modules)")
    for m in layers + [model]:  # the model last: it holds what no layer does (embeddings, head)
        fully_shard(m, mesh=mesh, reshard_after_forward=m is not model or not keep_gathered)
        if not hasattr(m, "set_force_sum_reduction_for_comms"):
            raise UserError(f"--fsdp: torch {torch.__version__} lacks FSDP2's plain-sum gradient reduction; "
                            "upgrade torch")
        m.set_gradient_divide_factor(1.0)  # a sum (gloo has no average, nor NCCL's pre-scaled sum)
        m.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model):
    try:
        from torch.distributed.fsdp import FSDPModule  # torch 2.6 and later
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def full_state_dict(model):
    """The whole state dict of a sharded model on process 0, on the CPU (every process must
    call it; the others get {}); a plain model's own state dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def clip_gradients(model, max_norm):
    """Clip the trainable parameters' gradients to a total norm of `max_norm` (0: no clipping)
    -> the norm before clipping, a float (under FSDP, over every process's shards)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                          max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def open_run(out, flags, wandb_project=None, header=None):
    """Create the output folder, write the flags (args.json and the first metrics.jsonl record,
    with `header`), start wandb when asked -> (log, finish): log(step, record) appends a
    record to metrics.jsonl (and wandb); finish() closes wandb."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(flags, f, indent=2)
    metrics_path = os.path.join(out, "metrics.jsonl")
    append_jsonl(metrics_path, {"args": flags, **(header or {})})
    wandb = None
    if wandb_project:
        try:
            import wandb  # optional dependency, imported only when asked for
        except ImportError:
            raise UserError("--wandb-project: wandb is not installed (pip install wandb)") from None
        wandb.init(project=wandb_project, config=flags)

    def log(step, record):
        append_jsonl(metrics_path, record)
        if wandb:
            wandb.log(record, step=step)

    def finish():
        if wandb:
            wandb.finish()

    return log, finish


# ----------------------------------------------------------------------------------------
# checkpoints: Hugging Face format, written under a temporary name and renamed


def save_checkpoint(path, model, tok, args=None, state=None, weights=None):
    """Save model + tokenizer (+ the run's flags as args.json, + the training state of
    `state` as trainer_state.pt, for --resume) to `path` atomically. `weights`: the model's
    whole state dict when the model itself holds only a shard of it (FSDP).

    A LoRA model is saved merged (a plain checkpoint that every script loads), with its
    adapters beside it in `adapter/` (what --resume goes on from).

    A crash while writing leaves only a `.tmp-` folder behind; `path` is either the
    previous complete checkpoint or the new complete one, never a half-written one.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    old = path.with_name(f".old-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_lora(model):
        model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model))
        model.save_pretrained(tmp / "adapter", save_embedding_layers=False)  # (no look-up on the hub)
    else:
        model.save_pretrained(tmp, state_dict=weights)
    tok.save_pretrained(tmp)
    if args is not None:
        with open(tmp / "args.json", "w") as f:
            json.dump(args, f, indent=2)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # left by a crash between the two renames below
        os.replace(path, old)  # a folder cannot be replaced in place: move the old one aside
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def prune_checkpoints(out, keep):
    """Delete all but the newest `keep` step-NNNNNN checkpoints of a run folder (0 keeps all)."""
    steps = sorted(d for d in os.listdir(out) if d.startswith("step-")) if keep else []
    for d in steps[:-keep]:
        shutil.rmtree(os.path.join(out, d))


# ----------------------------------------------------------------------------------------
# exact resume: a checkpoint also holds everything the next step depends on

STATE_FILE = "trainer_state.pt"
# flags whose change on resume makes the run differ from an uninterrupted one (beyond the
# number of steps, the logging and the saving)
RESUME_CHECKED = ["model", "data", "template", "seed", "lr", "weight_decay", "warmup_steps", "grad_clip",
                  "prompts_per_step", "group", "temperature", "top_p", "rewards", "beta", "kl", "scale", "agg",
                  "num_iterations", "batch_size", "epochs", "min_lr_ratio", "kd_weight", "teacher"]


def rng_state(generators=()):
    """Every random state a process draws from: Python's, numpy's, torch's (CPU and its own
    GPU) and the run's own torch.Generators (sampling, evaluation)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "generators": [g.get_state() for g in generators]}


def set_rng_state(state, generators=()):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


def resume_from(out, resume, flags):
    """The checkpoint --resume names -> (its folder, its training state). `resume` is "latest"
    (the newest checkpoint of `out` that holds a training state) or a checkpoint folder.
    Refuses to resume into an `out` that holds later checkpoints (two histories would mix),
    and warns about changed flags that the resumed run will follow."""
    if resume == "latest":
        found = sorted(d for d in os.listdir(out) if d.startswith("step-")
                       and os.path.exists(os.path.join(out, d, STATE_FILE))) if os.path.isdir(out) else []
        if not found:
            raise UserError(f"--resume: {out} holds no checkpoint with a {STATE_FILE} to resume from")
        path = os.path.join(out, found[-1])
    else:
        path = resume
        if not os.path.exists(os.path.join(path, STATE_FILE)):
            raise UserError(f"--resume {path}: no {STATE_FILE} there (not a checkpoint of this project's runs)")
    # the state holds Python objects (RNG states), so it is unpickled: load only your own
    # checkpoints. Tensors come to the CPU, mapped from the file; each is copied to its
    # parameter's device from there
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False,
                       mmap=True)  # processes share the file's pages instead of a copy each
    later = sorted(d for d in os.listdir(out) if d.startswith("step-") and d[5:].isdigit()
                   and int(d[5:]) > state["step"]) if os.path.isdir(out) else []
    if later:
        raise UserError(f"--resume {path}: {out} holds later checkpoints ({', '.join(later)}) of the run that "
                        "went on from there; resume into a new --out, or delete them")
    changed = [f"--{k.replace('_', '-')} {state['flags'][k]} -> {v}" for k, v in flags.items()
               if k in RESUME_CHECKED and state["flags"].get(k) != v]
    if changed and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: resuming with changed flags ({'; '.join(changed)}): the run goes on, but not as "
              "the uninterrupted one would have")
    return path, state


def save_training_checkpoint(out, step, model, opt, tok, flags, state, generators, keep, rank):
    """OUT/step-NNNNNN for --resume: the model, the optimizer's state, `state` (what else the
    script must restore), every process's random streams and the flags, written by process
    0, which then keeps the newest `keep` checkpoints. Every process must call it (an FSDP
    model's shards are gathered). Returns the path (None in the other processes)."""
    rngs = all_gather([rng_state(generators)])  # each process's own, in rank order
    weights, optimizer = None, opt.state_dict()
    if is_sharded(model):  # whole tensors, gathered to process 0's CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = full_state_dict(model)
        if getattr(model.config, "tie_word_embeddings", False):  # the head's gathered copy of the input embeddings
            weights.pop(next(f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
        # (before the first step there is no state, and asking for it would take a step of zeros)
        optimizer = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
            if opt.state else None
    if rank:
        return None
    path = save_checkpoint(os.path.join(out, f"step-{step:06d}"), model, tok, flags,
                           {**state, "optimizer": optimizer, "step": step, "rng": rngs, "flags": flags}, weights)
    prune_checkpoints(out, keep)
    return path


def stop_if_bad(bad_steps, limit):
    """--max-bad-steps: stop a run whose last `limit` steps were all skipped (0: never)."""
    if limit and bad_steps >= limit:
        raise UserError(f"--max-bad-steps {limit}: the last {bad_steps} steps had a non-finite loss or gradient "
                        "and were skipped; stopping. Lower --lr, or --resume from a checkpoint before the trouble")


def restore_optimizer(model, opt, state, path, world, weight_decay):
    """The resumed optimizer (after a check that as many processes resume as wrote `state`,
    sharded or not as it was); weight decay follows the flag, and the learning rate is set
    by the loop every step."""
    if len(state["rng"]) != world:
        raise UserError(f"--resume {path}: written by {len(state['rng'])} processes, resumed by {world}; "
                        "each process continues its own random streams, so use as many")
    for flag, now in [("fsdp", is_sharded(model)), ("lora_rank", is_lora(model))]:
        if bool(state["flags"].get(flag)) != now:
            raise UserError(f"--resume {path}: written {'with' if not now else 'without'} --{flag.replace('_', '-')}; "
                            "resume the same way (the optimizer's state differs)")
    if is_sharded(model) and state["optimizer"] is not None:  # each process takes its shard of the whole tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    elif not is_sharded(model):
        opt.load_state_dict(state["optimizer"])
    for group in opt.param_groups:
        group["weight_decay"] = weight_decay


def truncate_jsonl(path, step):
    """Drop the records of steps after `step` (logged after the checkpoint a run resumes from),
    atomically; records without a step (a run's header) stay."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:  # the half-written last line of a killed run
            lines.pop()
    lines = [line for line in lines if json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)
