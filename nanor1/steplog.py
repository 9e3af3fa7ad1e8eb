"""What a training step shows: its record of what was sampled, its one log line, and the
warnings about a run that cannot learn. grpo.py calls them after every step."""

import numpy as np
import torch

from nanor1.common import warn0
from nanor1.distributed import all_gather


def step_metrics(step, sampled, rewards_names, G, accuracy=None):
    """The step's record of what was sampled, over every process's samples: the reward and
    each part, accuracy (logged even when not trained on: `accuracy` is its score function,
    rewards.scorer("accuracy")), length, truncation, zero_var."""
    seen = [{"reward": r["reward"], "parts": r["parts"], "len": len(r["completion"]), "trunc": r["truncated"]}
            for r in sampled]
    if "accuracy" not in rewards_names and accuracy and all("answer" in r["example"] for r in sampled):
        scored = accuracy([r["text"] for r in sampled], [r["example"] for r in sampled])  # e.g. under --rewards format
        for x, (total, _, _) in zip(seen, scored):
            x["accuracy"] = total
    seen = all_gather(seen)  # (rounds * P * G,) in rank order, groups whole
    rewards_t = torch.tensor([x["reward"] for x in seen])
    record = {"step": step, "reward": rewards_t.mean().item()}
    for name in rewards_names:
        record[name] = float(np.mean([x["parts"][name] for x in seen]))
    if "accuracy" not in record and all("accuracy" in x for x in seen):
        record["accuracy"] = float(np.mean([x["accuracy"] for x in seen]))
    record["len"] = float(np.mean([x["len"] for x in seen]))
    record["trunc"] = float(np.mean([x["trunc"] for x in seen]))
    # groups whose rewards are all equal teach GRPO nothing (PPO's single samples: not a group, None)
    record["zero_var"] = (rewards_t.view(-1, G).std(dim=1) == 0).float().mean().item() if G > 1 else None
    return record


def log_line(record, args, rewards_names, extra=()):
    """The step's one line, its keys always in this order ('-' for what a step without an update
    lacks). extra: (key, format) pairs a script adds before the learning rate (ppo.py's value model's)."""
    show = lambda value, spec: "-" if value is None else format(value, spec)
    line = f"step {record['step']}/{args.num_steps} | reward {record['reward']:.3f}"
    shown = rewards_names + ([] if "accuracy" in rewards_names else ["accuracy"])
    line += "".join(f" | {name} {record[name]:.3f}" for name in shown if name in record)
    line += f" | len {record['len']:.0f} | trunc {record['trunc']:.2f} | zero_var {show(record['zero_var'], '.2f')}"
    if getattr(args, "dynamic_sampling", False):
        line += f" | rounds {record['rounds']} | groups {record['groups']}/{args.prompts_per_step}"
    if getattr(args, "sample_dtype", "same") != "same":  # the sampler against the trained weights, KL(pi_sampler || pi_old)
        line += f" | mismatch {show(record['sampler_kl'], '.1e')}"
    return line + (f" | kl {show(record['kl'], '.4f')} | clip {show(record['clip'], '.3f')}"
                   f" | ent {show(record['entropy'], '.2f')} | gnorm {show(record['gnorm'], '.3f')}"
                   + "".join(f" | {key} {show(record[key], spec)}" for key, spec in extra) +
                   f" | lr {record['lr']:.1e} | {record['tok/s']:.0f} tok/s | {record['s']:.1f}s")


def warn_about(record, args, last_warned):
    """Warn about the signs of a run that cannot learn that this step shows, each at most every
    20 steps; last_warned: {sign: the step it was last warned about}."""
    out = []
    if record["trunc"] > 0.5:
        out.append(("trunc", f"{record['trunc']:.0%} of completions hit --max-new-tokens {args.max_new_tokens} "
                             "without ending; their rewards are usually 0: raise the limit"))
    if getattr(args, "dynamic_sampling", False) and record["groups"] < args.prompts_per_step:
        out.append(("rounds", f"only {record['groups']} of {args.prompts_per_step} groups had reward variance "
                              f"after {record['rounds']} rounds (--max-sampling-rounds); the step trained on those"))
    if (record["zero_var"] or 0) > 0.5:
        out.append(("zero_var", f"{record['zero_var']:.0%} of groups have equal rewards and teach nothing: the task "
                                "is too hard or too easy; try a larger --group or --dynamic-sampling"))
    for key, message in out:
        if record["step"] - last_warned.get(key, -20) >= 20:
            last_warned[key] = record["step"]
            warn0(f"warning: {message}")
