"""The sampling engine: G completions per prompt, scored by the rules; pass@1 evaluation.

sample() is the whole decoding loop: encode each prompt once, repeat its KV cache G times,
then draw one token per live completion per step until every completion has ended or hit
the limit. rollout() decodes and scores what sample() drew (write_samples() keeps some to
read); evaluate() is R1's pass@1 protocol on held-out prompts (eval_line() its log line).
grpo.py samples and evaluates with them, sft.py evaluates, reject_sample.py samples.

What makes it fast, each under "the speed tricks" below or commented where it happens:
- the prompt is encoded once per group and its KV cache repeated (not G prompt passes);
- a completion that ends leaves the batch: later steps cost only what is still sampling;
- a token is drawn by inverse CDF, one random number a row (multinomial draws one for
  every vocabulary entry);
- the KV cache is written in place into room kept ahead, not concatenated every token
  (which copies the whole cache, every layer);
- the decoding mask is built once as SDPA's 4D mask and sliced, not rebuilt every token;
- it runs under torch.inference_mode.
Each row draws its random numbers from its own place in the stream, so what a row samples
does not depend on when the others end.
"""

import functools
import sys
import time
from copy import deepcopy

import torch

from nanor1.common import append_jsonl
from nanor1.distributed import all_sum, is_sharded

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


def pad_batch(prompts, completions, pad_id, device):
    """Token-id lists -> prompt_ids, prompt_mask (B, Lp) padded on the left and
    ids, mask (B, T) padded on the right: each micro-batch is padded only to its own lengths."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    T = max(1, max(len(c) for c in completions))
    ids = torch.tensor([c + [pad_id] * (T - len(c)) for c in completions], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions], dtype=torch.long, device=device)
    return prompt_ids, prompt_mask, ids, mask


@functools.cache
def cache_name():
    """The KV cache's name, as the model's argument and its output's field: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name still works there, with a deprecation warning, until 5.40)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def sample(model, prompts, group, max_new_tokens, eos, pad_id, temperature=1.0, top_p=1.0,
           generator=None, vocab=None, logp=False, entropy=False):
    """Sample `group` completions for each prompt (lists of token ids), prompt-major order.

    The prompt is encoded once and its KV cache repeated G times. A completion that ends
    leaves the batch (its rows of the cache are dropped), so the forward passes cost only
    what is still being sampled. Each row draws its random numbers from its own place in
    the stream, so what a row samples does not depend on when the others end. vocab: the
    tokenizer's size; a model with more output rows (Qwen pads 151,665 tokens to 151,936)
    never samples past it. Returns:
      ids   (P*G, T) completion tokens, pad after the end token
      mask  (P*G, T) 1 on completion tokens up to and including the end token
      truncated (P*G,) True when the limit was hit without an end token
      logp  (P*G, T) with logp=True: each drawn token's log-prob under the sampler, at the
            temperature and before top-p (as the trainer computes it: the two can be compared)
      entropy (P*G, T) with entropy=True: the entropy of each step's distribution, the same way
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
        cache = getattr(out, cache_name())
        cache.batch_repeat_interleave(group)  # (P, ...) -> (P*G, ...): the prompt is encoded once
        layers = getattr(cache, "layers", [])
        plain = bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)  # full attention
        for layer in layers:  # plain layers get room for the completion
            if type(layer).__name__ == "DynamicLayer" and layer.keys is not None:  # None: a layer with no cache
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
        logps = torch.zeros((N, max_new_tokens), device=device) if logp else None  # (N, T)
        ents = torch.zeros((N, max_new_tokens), device=device) if entropy else None
        done = torch.zeros(N, dtype=torch.bool, device=device)  # (N,)
        rows = torch.arange(N, device=device)  # (n,) which of the N completions each batch row is
        for t in range(max_new_tokens):
            u = torch.rand(N, generator=generator, device=device)[rows] if temperature else None
            tok = sample_next(logits[:, :vocab], temperature, top_p, generator, u)  # (n,)
            live = ~done[rows]  # (n,) all of them, but under FSDP
            ids[rows, t] = torch.where(live, tok, pad_id)
            if logp or entropy:  # what the sampler's own probabilities were: the logits are here
                z = torch.log_softmax(logits[:, :vocab].float() / temperature, dim=-1)  # (n, V)
                if logp:
                    logps[rows, t] = z.gather(-1, tok[:, None]).squeeze(-1)
                if entropy:
                    ents[rows, t] = -(z.exp() * z).sum(-1)
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
                        use_cache=True, **{cache_name(): cache})
            cache, logits, next_pos = getattr(out, cache_name()), out.logits[:, -1], next_pos + 1
    model.train(was_training)
    return {"ids": ids[:, :t + 1], "mask": mask[:, :t + 1], "truncated": ~done,  # (N, T'): T' the longest
            "logp": logps[:, :t + 1] if logp else None, "entropy": ents[:, :t + 1] if entropy else None}


def low_precision_copy(model, dtype, copy=None):
    """`model` with its weights in `dtype`, to sample from: made on the first call, its weights
    refreshed in place on the next (-> the copy). Decoding a token reads every weight, so
    half the bytes (and a CPU's bf16 matrix units) make sampling faster; the model itself
    keeps float32 weights for the update. Buffers (rotary frequencies) stay float32. The
    copy's distribution differs from the model's by bf16's rounding; the log-probs of the
    update are the model's own."""
    if copy is None:  # each weight copied straight to `dtype` (no float32 copy first); tied ones stay tied
        low = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
        return deepcopy(model, memo=low).eval()
    with torch.no_grad():
        for c, p in zip(copy.parameters(), model.parameters()):
            c.copy_(p)
    return copy

# ----------------------------------------------------------------------------------------
# scoring and evaluation


def rollout(model, tok, examples, prompt_ids, group, max_new_tokens, temperature, top_p,
            eos, score, generator, defaults, warn=None, timings=None, logp=False, entropy=False):
    """Sample `group` completions per example and score them -> list of per-completion dicts.

    score(texts, contexts) -> [(total, {name: value}, [errors])]: the scoring, passed in by
    the script (rewards.scorer("accuracy,format")), so this engine knows no reward. defaults:
    fields the rewards fall back on when an example lacks them (the language, the overlong
    buffer). warn: prints a reward's error (on stderr when None). timings: a dict whose
    "sample" and "score" entries get the seconds each took added. With logp=True each row
    also holds the sampler's log-prob of each completion token ("sampler_logp"), with
    entropy=True the entropy of each step's distribution ("entropy"): what a trainer compares
    with its own numbers; evaluation and rejection sampling skip them.
    """
    warn = warn or functools.partial(print, file=sys.stderr)
    t0 = time.time()
    out = sample(model, prompt_ids, group, max_new_tokens, eos, tok.pad_token_id,
                 temperature, top_p, generator, vocab=len(tok), logp=logp, entropy=entropy)
    lengths = out["mask"].sum(1).tolist()  # (waits for the GPU)
    t1 = time.time()
    ids, truncated = out["ids"].tolist(), out["truncated"].tolist()
    completions = [ids[i][: lengths[i]] for i in range(len(ids))]
    stats = {name: [row[:n] for row, n in zip(out[k].tolist(), lengths)]  # per completion, its tokens'
             for k, name in [("logp", "sampler_logp"), ("entropy", "entropy")] if out[k] is not None}
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    # the length rules see the completion's length in tokens beside the example's fields
    contexts = [{**defaults, **examples[i // group], "num_tokens": lengths[i], "max_tokens": max_new_tokens}
                for i in range(len(ids))]
    rows = []
    for i, (total, parts, errors) in enumerate(score(texts, contexts)):
        ex = examples[i // group]
        for e in errors:
            warn(f"warning: {ex.get('_where', '?')}: {e}")
        rows.append({"prompt": prompt_ids[i // group], "completion": completions[i], "text": texts[i],
                     "truncated": truncated[i], "reward": total, "parts": parts, "example": ex,
                     **{name: v[i] for name, v in stats.items()}})
    if timings is not None:
        timings["sample"] += t1 - t0
        timings["score"] += time.time() - t1
    return rows


def evaluate(model, tok, examples, prompt_ids, eos, generator, num_samples, max_new_tokens,
             temperature=0.6, top_p=0.95, prompts_per_batch=8, defaults=None, warn=None, *, score):
    """pass@1 averaged over `num_samples` samples per prompt (R1's protocol: temperature 0.6,
    top-p 0.95), with the format rate, the truncation rate and the mean length in tokens.
    score: as rollout's, giving the parts "accuracy" and "format" (rewards.scorer("accuracy,format"))."""
    acc = fmt = length = trunc = 0.0
    for s in range(0, len(examples), prompts_per_batch):
        rows = rollout(model, tok, examples[s:s + prompts_per_batch], prompt_ids[s:s + prompts_per_batch],
                       num_samples, max_new_tokens, temperature, top_p, eos, score, generator,
                       defaults or {}, warn)
        for r in rows:
            acc, fmt = acc + r["parts"]["accuracy"], fmt + r["parts"]["format"]
            length, trunc = length + len(r["completion"]), trunc + r["truncated"]
    n = len(examples) * num_samples
    return {"eval_pass@1": acc / n, "eval_format": fmt / n, "eval_len": length / n, "eval_trunc": trunc / n}


def write_samples(path, step, rows):
    """Append rollout rows to a samples.jsonl, with their prompt, answer and rewards, to read."""
    for r in rows:
        append_jsonl(path, {"step": step, "prompt": r["example"]["prompt"], "answer": r["example"].get("answer"),
                            "completion": r["text"], "reward": r["reward"], "parts": r["parts"],
                            "num_tokens": len(r["completion"]), "truncated": r["truncated"]})


def eval_line(step, ev):
    """evaluate()'s figures as a run's log line."""
    return (f"eval step {step} | pass@1 {ev['eval_pass@1']:.3f} | format {ev['eval_format']:.3f}"
            f" | len {ev['eval_len']:.0f} | trunc {ev['eval_trunc']:.2f}")

# ----------------------------------------------------------------------------------------
# the speed tricks: one random number a token, a KV cache written in place


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
