"""Per-token log-probs of completions under a model, in one forward pass: what every
policy-gradient step needs (grpo.py's and ppo.py's policy, reference and pi_old)."""

import torch

LOGIT_CHUNK = 2**24  # float32 entries of the logits turned into log-probs at once (64 MiB)


def completion_logprobs(model, prompt_ids, prompt_mask, ids, mask, temperature=1.0,
                        with_entropy=False, vocab=None):
    """Log-probs (B, T) of completion tokens `ids` given left-padded prompts, in one forward.

    Logits are divided by the sampling temperature so that the probabilities are those of
    the distribution that was sampled. Only the T completion positions reach the LM head.
    Log-softmax runs on chunks of whole sequences, about LOGIT_CHUNK entries each (one
    sequence at least), and is recomputed in the backward pass: at most one chunk's float32
    copy of the logits exists at a time, in the forward and in the backward pass, beside
    the model's own logits. Padding positions get 0. Gradients flow unless the caller is
    under torch.no_grad(). vocab: the tokenizer's size; the rows a model has past it (Qwen's
    padding) are left out, as sampling leaves them out. Returns logp, or (logp, entropy).
    """
    from torch.utils.checkpoint import checkpoint

    B, T = ids.shape
    input_ids = torch.cat([prompt_ids, ids], dim=1)  # (B, Lp + T)
    attn = torch.cat([prompt_mask, mask], dim=1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding takes no positions
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos,
                   use_cache=False, logits_to_keep=T + 1).logits[:, :-1, :vocab]  # (B, T, V)

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
