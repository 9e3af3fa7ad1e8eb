"""GRPO (DeepSeekMath, DeepSeek-R1-Zero) on any Hugging Face causal LM, in one file.

Each step: take --prompts-per-step prompts, sample --group completions for each from the
current policy, score them with rule rewards (rewards.py), turn each reward into an
advantage by comparing it with its own group (no value model), and maximise the clipped
surrogate minus beta * KL to a frozen reference model (k3 estimator by default).

About the logged loss: with one update per batch of samples (--num-iterations 1) the
policy that sampled and the policy being updated are the same, so ratio = 1 and the
surrogate's value is the mean advantage, about 0. Its gradient is not 0: it is the policy
gradient. Watch reward, KL and grad norm to see that training happens, not the loss.

Deliberate simplifications:
- one optimizer step per pass over the batch of samples (--num-iterations passes);
- old log-probs are the first pass's own log-probs, detached: the weights have not moved
  yet, so they equal the sampling policy's and cost no extra forward pass (but for
  rounding, or a bfloat16 sampler's difference: both logged every step, --tis corrects);
- --top-entropy ranks tokens by the sampler's entropies (the policy before the update),
  the threshold taken over the whole step's batch, every process's tokens;
- top-p truncation is ignored in the log-probs (as in TRL); temperature is not;
- several processes are plain data parallelism: each samples --prompts-per-step / N of
  the prompts (whole groups) and every process holds the whole model; the gradients are
  summed once per update, not overlapped with the backward pass as DDP does; evaluation
  runs on process 0 alone;
- --fsdp (FSDP2) shards the policy, its gradients and AdamW state and the reference over
  the processes, but each process first loads the whole model on the CPU, a checkpoint
  gathers the whole weights and optimizer state on process 0's CPU, every process runs
  the evaluation (FSDP's gathers need them all), and --dynamic-sampling is not offered;
- --lora-rank trains adapters on a frozen base (peft); its checkpoints are the merged model,
  with the adapters in adapter/ for --resume.

Variants are flags, each one's lines naming its paper: Dr. GRPO (--scale none --agg seq-sum),
DAPO (--clip-high 0.28 --agg token-mean --dynamic-sampling --beta 0), GSPO (--ratio-level
sequence), CISPO, SAPO, plain policy gradient (--objective cispo, sapo, pg), RLOO (--baseline
loo), Lite PPO and REINFORCE++-baseline (--scale batch, batch-centred), dual clip (--clip-c
3), high-entropy tokens only (--top-entropy 0.2), truncation masking (--mask-truncated),
truncated importance sampling for a bfloat16 sampler (--tis 2). At --num-iterations 1 every
ratio is 1 and the clip, GSPO, CISPO, SAPO and pg objectives take the same step: they part
ways only from a batch's second pass on.

    python grpo.py --model Qwen2.5-0.5B --group 8 --data data/gsm8k/train.jsonl
    python grpo.py --model out/tiny --data train.jsonl --device cpu --max-new-tokens 64
    torchrun --nproc_per_node 8 grpo.py --model Qwen2.5-1.5B --group 8 --prompts-per-step 64 --data ...
    torchrun --nproc_per_node 8 grpo.py --model Qwen2.5-7B --fsdp --grad-checkpointing --data ...
    python grpo.py --model Qwen2.5-1.5B --lora-rank 64 --lora-alpha 128 --lr 1e-5 --data ...

Ctrl-C (or SIGTERM) stops a run at the end of its step with a checkpoint; a run that dies
goes on from its newest one (every --save-every steps) with the same command plus --resume.
A checkpoint holds the policy, the optimizer, the step, the position in the data order,
every random state and a reference that --ref-reset-every moved, so the resumed run trains
exactly as an uninterrupted one would have (bitwise on CPU; tests/test_resume.py).
"""

import argparse
import contextlib
import functools
import math
import os
import sys

import torch

import rewards as R
from nanor1 import checkpoints, common, distributed, models, sampling, steplog
from nanor1.logprobs import completion_logprobs

# flags whose change on --resume makes the run differ from an uninterrupted one (a warning names them)
RESUME_CHECKED = ["model", "data", "template", "seed", "lr", "weight_decay", "warmup_steps", "grad_clip",
                  "prompts_per_step", "group", "temperature", "top_p", "rewards", "beta", "kl", "scale", "agg",
                  "num_iterations", "lr_schedule", "min_lr_ratio", "objective", "ratio_level", "clip_low", "clip_high",
                  "clip_c", "sapo_tau_pos", "sapo_tau_neg", "baseline", "top_entropy", "tis", "tis_level", "sample_dtype"]


def get_args(argv=None):
    p = common.short_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    # model
    p.add_argument("--model", default="Qwen2.5-0.5B", help="local folder, hub id, or short name (Qwen2.5-0.5B)")
    p.add_argument("--template", default="r1", choices=["r1", "chat", "raw"],
                   help="prompt format: R1-Zero plain-text template, tokenizer chat template, or the prompt as is")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (weights and optimizer stay float32); auto = bfloat16 on CUDA, else float32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--sample-dtype", default="same", choices=["same", "bfloat16"],
                   help="same: sample with the trained weights (under --dtype); bfloat16: from a bfloat16 copy, "
                        "refreshed after every update (faster on a GPU or a CPU with bf16 units; one more copy)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA adapters of this rank on every linear layer instead of all weights; 0 = off (needs peft)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator: adapters are scaled by alpha / rank")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard weights, gradients, AdamW state and the reference over the processes (FSDP2)")
    # data
    p.add_argument("--data", required=True, help="training prompts, jsonl with 'prompt' and 'answer'")
    p.add_argument("--eval-data", default=None, help="held-out jsonl for --eval-every")
    # sampling
    p.add_argument("--group", type=int, default=8, help="completions per prompt, G (DeepSeekMath: 64)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step; P*G completions per step")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="completion length limit, tokens; default 1024, or what the context leaves when less")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off")
    p.add_argument("--ignore-eos", action="store_true",
                   help="sample every completion to --max-new-tokens, past end tokens (bench.py: equal work per step)")
    # rewards
    p.add_argument("--rewards", default="accuracy,format",
                   help="comma list of rewards.py names with optional :weight, e.g. accuracy,format:0.5,language:0.1")
    p.add_argument("--lang", default="en", help="target language of the language reward for examples without 'lang'")
    p.add_argument("--overlong-buffer", type=int, default=None,
                   help="tokens before --max-new-tokens where the overlong penalty starts; default a fifth (DAPO: 4096 of 20480)")
    # loss
    p.add_argument("--beta", type=float, default=0.04, help="KL weight; 0 = no reference model is loaded")
    p.add_argument("--kl", default="k3", choices=["k1", "k2", "k3"], help="KL estimator")
    p.add_argument("--objective", default="clip", choices=["clip", "cispo", "sapo", "pg"],
                   help="policy term: PPO's clipped surrogate (GRPO), CISPO's clipped detached weight on log pi, "
                        "SAPO's soft gate, or plain policy gradient -A log pi")
    p.add_argument("--ratio-level", default="token", choices=["token", "sequence"],
                   help="importance ratio per token, or one per completion, the geometric mean of its tokens' (GSPO)")
    p.add_argument("--clip-low", type=float, default=None,
                   help="ratio clipped below at 1 - clip-low; >= 1 = never (R1: 10); default 0.2, GSPO's 3e-4 with "
                        "--ratio-level sequence, none (1) with --objective cispo")
    p.add_argument("--clip-high", type=float, default=None,
                   help="ratio clipped above at 1 + clip-high (DAPO: 0.28); default 0.2, GSPO's 4e-4 with "
                        "--ratio-level sequence, 4 (a weight of at most 5) with --objective cispo")
    p.add_argument("--clip-c", type=float, default=0.0,
                   help="dual clip: with a negative advantage the per-token loss is capped at C x |A| (verl: 3); 0 = off")
    p.add_argument("--sapo-tau-pos", type=float, default=None, help="--objective sapo: gate temperature for A > 0 (1.0)")
    p.add_argument("--sapo-tau-neg", type=float, default=None, help="--objective sapo: gate temperature for A < 0 (1.05)")
    p.add_argument("--baseline", default="mean", choices=["mean", "loo"],
                   help="what a reward is compared with: its group's mean, or the mean of the other G-1 (RLOO)")
    p.add_argument("--scale", default="std", choices=["std", "batch", "batch-centred", "none"],
                   help="advantage divided by the group's reward std, the whole batch's (Lite PPO), the std of the "
                        "batch's advantages (REINFORCE++-baseline), or by nothing (Dr. GRPO)")
    p.add_argument("--top-entropy", type=float, default=1.0,
                   help="policy gradient only on the tokens whose entropy is in the batch's top share Q (paper: 0.2); "
                        "1 = all")
    p.add_argument("--tis", type=float, default=0.0,
                   help="with --sample-dtype bfloat16: weight the policy term by pi_old / pi_sampler, truncated "
                        "at C (truncated importance sampling; 2 is common); 0 = off")
    p.add_argument("--tis-level", default=None, choices=["sequence", "token"],
                   help="--tis weight: one per completion, the product of its tokens' ratios, truncated (default); "
                        "or per token")
    p.add_argument("--agg", default="seq-mean", choices=["seq-mean", "token-mean", "seq-sum"],
                   help="loss aggregation: paper, DAPO, Dr. GRPO (divides by --max-new-tokens)")
    p.add_argument("--num-iterations", type=int, default=1, help="updates per batch of samples (mu)")
    p.add_argument("--mask-truncated", action="store_true", help="leave completions that hit the limit out of the loss")
    p.add_argument("--dynamic-sampling", action="store_true",
                   help="DAPO: drop groups with equal rewards, sample more prompts to fill the step")
    p.add_argument("--max-sampling-rounds", type=int, default=4, help="with --dynamic-sampling: sampling rounds per step, at most")
    p.add_argument("--ref-reset-every", type=int, default=0, help="copy the policy into the reference every N steps; 0 = never")
    # optimisation
    p.add_argument("--num-steps", type=int, default=100, help="training steps (one sampling round + updates each)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "linear", "cosine"],
                   help="after the warm-up: constant (DeepSeekMath), or a decay to --min-lr-ratio x --lr at the "
                        "last step (TRL: linear to 0)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="with a decay: the last step's learning rate / --lr")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up, steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many steps in a row skipped for a non-finite loss or gradient; 0 = never")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = no clipping")
    p.add_argument("--micro-batch-size", type=int, default=8, help="completions per forward/backward pass")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    # evaluation
    p.add_argument("--eval-every", type=int, default=0, help="evaluate on --eval-data every N steps; with --eval-data it also runs at start and end")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per eval prompt, k of pass@1")
    p.add_argument("--eval-prompts", type=int, default=0, help="eval prompts used; 0 = all")
    p.add_argument("--eval-temperature", type=float, default=0.6, help="eval sampling temperature (R1: 0.6); 0 = greedy")
    p.add_argument("--eval-top-p", type=float, default=0.95, help="eval nucleus mass (R1: 0.95)")
    # logging and output
    p.add_argument("--out", default="out/grpo", help="output folder: metrics.jsonl, samples.jsonl, checkpoints")
    p.add_argument("--save-every", type=int, default=50,
                   help="checkpoint every N steps, and at the end; 0 = only at the end")
    p.add_argument("--save-total-limit", type=int, default=0, help="keep only the newest N checkpoints; 0 = all")
    p.add_argument("--save-optimizer", type=int, default=1, choices=[0, 1],
                   help="0: checkpoints hold the model without the optimizer's state, and cannot be resumed exactly")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run exactly: alone, from the newest checkpoint of --out; or from the checkpoint "
                        "folder given. --model stays the reference model's starting point")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run: its files go first")
    p.add_argument("--sample-every", type=int, default=10, help="write one group's completions every N steps; 0 = never")
    p.add_argument("--wandb-project", default=None, help="also log to this wandb project (wandb is optional)")
    args = p.parse_args(argv)

    # contradictions fail here, naming the flag, before any model is loaded
    if args.group < 2:
        p.error("--group must be at least 2: a group of one has no baseline to compare with")
    common.check_ranges(p, args, ["num_steps", "prompts_per_step", "max_new_tokens", "num_iterations", "micro_batch_size",
                                  "eval_samples", "max_sampling_rounds"],
                        ["warmup_steps", "eval_every", "eval_prompts", "save_every", "save_total_limit", "sample_every",
                         "ref_reset_every", "max_bad_steps", "lr", "weight_decay", "grad_clip", "beta", "clip_low", "clip_high",
                         "clip_c", "tis", "eval_temperature"])
    if args.temperature <= 0:
        p.error("--temperature must be > 0: greedy groups have no variance, and log-probs divide by it")
    if not 0 < args.top_p <= 1 or not 0 < args.eval_top_p <= 1:
        p.error("--top-p and --eval-top-p must be in (0, 1]")
    # the variants: the clip range each paper used unless given, and the mixtures that mean nothing
    lo, hi = (3e-4, 4e-4) if args.ratio_level == "sequence" else (0.2, 0.2)  # GSPO's; DeepSeekMath's
    lo, hi = (1.0, 4.0) if args.objective == "cispo" else (lo, hi)  # CISPO: no lower bound, a weight <= 5
    if args.objective in ("sapo", "pg"):  # no clip range: none is logged either
        if args.clip_low is not None or args.clip_high is not None:
            p.error(f"--clip-low and --clip-high: --objective {args.objective} has no clip range")
        lo = hi = None
    args.clip_low = lo if args.clip_low is None else args.clip_low
    args.clip_high = hi if args.clip_high is None else args.clip_high
    if args.ratio_level == "sequence" and args.objective != "clip":
        p.error(f"--ratio-level sequence is GSPO's form of the clipped objective, not of --objective {args.objective}")
    if args.clip_c and (args.objective != "clip" or args.clip_c <= 1):
        p.error("--clip-c caps the clipped objective's loss at C |A|: it needs --objective clip and C > 1")
    if args.objective != "sapo" and (args.sapo_tau_pos is not None or args.sapo_tau_neg is not None):
        p.error("--sapo-tau-pos and --sapo-tau-neg are the gate temperatures of --objective sapo")
    args.sapo_tau_pos = 1.0 if args.sapo_tau_pos is None else args.sapo_tau_pos
    args.sapo_tau_neg = 1.05 if args.sapo_tau_neg is None else args.sapo_tau_neg
    if args.sapo_tau_pos <= 0 or args.sapo_tau_neg <= 0:
        p.error("--sapo-tau-pos and --sapo-tau-neg must be > 0")
    if args.objective == "pg" and args.num_iterations > 1:
        p.error("--objective pg has no importance ratio: passes after the first would train off-policy, uncorrected; "
                "use --num-iterations 1")
    if not 0 < args.top_entropy <= 1:
        p.error("--top-entropy must be in (0, 1]: the share of tokens kept")
    if args.top_entropy < 1 and args.ratio_level == "sequence":
        p.error("--top-entropy with --ratio-level sequence: GSPO's ratio carries every token's gradient, so it "
                "cannot keep only some tokens")
    if args.tis_level is not None and not args.tis:
        p.error("--tis-level sets the form of --tis's weight: give --tis C too")
    args.tis_level = args.tis_level or "sequence"
    if args.tis and (args.sample_dtype == "same" or args.tis < 1):
        p.error("--tis corrects for a sampler that is not the trained weights: it needs --sample-dtype bfloat16, "
                "and C >= 1")
    if args.lora_rank < 0:
        p.error("--lora-rank must be 0 (off) or more")
    if args.ref_reset_every and args.beta == 0:
        p.error("--ref-reset-every needs --beta > 0: at --beta 0 no reference model is loaded")
    if args.lora_rank and args.ref_reset_every:
        p.error("--ref-reset-every with --lora-rank: the reference is the base with the adapters off, which never moves")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        p.error("--fsdp shards the model over the processes of torchrun: run under torchrun --nproc_per_node N >= 2")
    if args.fsdp and (args.lora_rank or args.dynamic_sampling or args.sample_dtype != "same"):
        p.error("--fsdp with --lora-rank, --dynamic-sampling or --sample-dtype bfloat16 is not supported (the "
                "processes would run different numbers of forward passes; a whole bfloat16 copy undoes the sharding)")
    if (args.eval_every or args.eval_prompts) and not args.eval_data:
        p.error("--eval-every and --eval-prompts need --eval-data")
    try:
        R.parse_rewards(args.rewards)
    except ValueError as e:
        p.error(f"--rewards: {e}")
    if args.lang not in R.SCRIPTS:
        p.error(f"--lang: unknown language '{args.lang}' (known: {', '.join(sorted(R.SCRIPTS))})")
    if args.overlong_buffer is not None and args.overlong_buffer < 0:  # its upper bound: in load_data
        p.error("--overlong-buffer must be 0 or more")
    if args.resume and args.overwrite:
        p.error("--resume goes on with the run in --out, --overwrite removes it: pick one (after a run "
                "started with --overwrite, drop it to add --resume)")
    if not 0 <= args.min_lr_ratio <= 1:
        p.error("--min-lr-ratio must be in [0, 1]")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.prompts_per_step % world:
        p.error(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes "
                "(each process samples whole groups)")
    return args


# ----------------------------------------------------------------------------------------
# the algorithm


def group_advantages(rewards, group_size, scale="std", baseline="mean", eps=1e-4):
    """Each reward compared with its own group: (r - baseline) [/ scale].

    rewards: (N,) ordered prompt-major (the G completions of prompt 0, then prompt 1, ...);
    float64 stays float64. A group whose rewards are all equal gets advantage 0: it teaches
    nothing. The baseline, what a reward is compared with:
      "mean"  the group's mean (GRPO, DeepSeekMath arXiv 2402.03300);
      "loo"   the mean of the other G-1 rewards of the group (RLOO, arXiv 2402.14740):
              r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) x (r_i - mean), an unbiased
              baseline since it does not contain r_i itself.
    The scale, what the difference is divided by:
      "std"   the group's std (GRPO), plus eps;
      "none"  nothing (Dr. GRPO, arXiv 2503.20783: the std up-weights groups that are
              nearly all right or all wrong);
      "batch" the std of the whole batch's rewards, plus eps ("Lite PPO", arXiv 2508.08221:
              group mean, batch std; TRL's scale_rewards="batch");
      "batch-centred" the std of the whole batch's advantages, plus eps (REINFORCE++-baseline,
              arXiv 2501.03262): smaller, without the spread between prompts. (Its batch mean
              is 0 already: verl and OpenRLHF also subtract it, per token.)
    Every std is the unbiased sample std.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size).to(torch.promote_types(rewards.dtype, torch.float32))  # (P, G)
    if baseline == "mean":
        adv = r - r.mean(dim=1, keepdim=True)  # (P, G)
    elif baseline == "loo":  # RLOO, in the form whose all-equal groups give exactly 0
        adv = (r - r.mean(dim=1, keepdim=True)) * group_size / (group_size - 1)
    else:
        raise ValueError(f"baseline must be 'mean' or 'loo', not {baseline!r}")
    if scale == "std":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":  # Lite PPO
        adv = adv / (r.std() + eps)
    elif scale == "batch-centred":  # REINFORCE++-baseline
        adv = adv / (adv.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'std', 'batch', 'batch-centred' or 'none', not {scale!r}")
    return adv.view(-1)  # (N,)


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_low=0.2, clip_high=0.2, beta=0.04, kl="k3",
              agg="seq-mean", max_len=None, *, ratio_level="token", objective="clip", clip_c=0.0,
              top_entropy=1.0, entropy=None, entropy_cut=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05,
              sampler_logp=None, tis=None, tis_level="sequence"):
    """Negative GRPO objective on a batch of completions -> (loss, metrics).

    logp, old_logp, ref_logp, mask: (B, T) per-token log-probs under the policy (with grad),
    the policy before this step's updates (pi_old), the reference (None when beta is 0), and
    1 on completion tokens. adv: (B,) one advantage per completion, shared by its tokens.
    The keyword arguments are grpo.py's flags of the same names; at their defaults this is
    DeepSeekMath's GRPO. entropy: (B, T) per-token entropies, for top_entropy < 1 (the kept
    tokens are those at or above entropy_cut, by default the batch's (1 - top_entropy)
    quantile). sampler_logp: (B, T) the log-probs of the policy that drew the tokens, when it
    is not pi_old (a bfloat16 copy, an inference engine): logged, and with tis corrected.
    """
    if tis and sampler_logp is None or top_entropy < 1 and entropy is None:
        raise ValueError("tis needs sampler_logp, and top_entropy < 1 needs entropy")
    if ratio_level == "sequence" and top_entropy < 1:  # s_i would carry every token's gradient
        raise ValueError("a sequence-level ratio depends on every token: it cannot keep only some")
    mask = mask.bool()
    a = adv[:, None].to(logp.dtype)  # (B, 1)
    log_ratio = logp - old_logp.detach()  # (B, T)
    if ratio_level == "sequence":
        # GSPO (arXiv 2507.18071): one ratio per completion, the geometric mean of its token
        # ratios, s_i = exp(mean_t log(pi / pi_old)); every token carries s_i, so the clip
        # keeps or drops a whole completion. Its gradient is s_i A_i mean_t grad log pi: the
        # paper's GSPO and its GSPO-token form are the same here, advantages being per completion
        n = mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        log_ratio = (torch.where(mask, log_ratio, 0.0).sum(1, keepdim=True) / n).expand_as(logp)  # (B, T)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level must be 'token' or 'sequence', not {ratio_level!r}")
    ratio = torch.exp(log_ratio)  # (B, T); = 1 in value when mu = 1, but not in gradient
    if objective in ("clip", "cispo"):
        clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)  # (B, T)
    if objective == "clip":  # PPO's pessimistic bound (GRPO, DeepSeekMath arXiv 2402.03300)
        per_token = -torch.min(ratio * a, clipped * a)  # (B, T)
        if clip_c:  # dual clip (Ye et al. arXiv 1912.09729; verl's clip_ratio_c): with A < 0 the
            # loss |A| max(r, clip(r)) grows without bound in r; it is capped at C |A|
            per_token = torch.where(a < 0, torch.minimum(per_token, -clip_c * a), per_token)
    elif objective == "cispo":
        # CISPO (MiniMax-M1, arXiv 2506.13585): the clipped ratio is a detached weight on
        # A log pi, so a token whose ratio is clipped still gets a gradient, only a bounded one
        per_token = -clipped.detach() * a * logp
    elif objective == "sapo":
        # SAPO (arXiv 2511.20347): a soft gate instead of the clip, f(r) = 4/tau sigmoid(tau (r - 1)),
        # with tau_neg > tau_pos so that updates from negative advantages fade sooner. Its
        # gradient weight is 4 p (1 - p), p = sigmoid(tau (r - 1)): 1 on policy, -> 0 far off it
        tau = torch.full_like(a, sapo_tau_neg).masked_fill(a > 0, sapo_tau_pos)  # (B, 1), in logp's dtype
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
    elif objective == "pg":
        # plain policy gradient (REINFORCE; GPG, arXiv 2504.02546): -A log pi, no ratio, no
        # clip; the floor the other objectives are measured against
        per_token = -a * logp
    else:
        raise ValueError(f"objective must be clip, cispo, sapo or pg, not {objective!r}")
    if tis:
        # truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
        # brings you off-policy RL training"): the tokens came from pi_sampler, not pi_old, so the
        # policy term (not the KL) is weighted by pi_old / pi_sampler, truncated at tis. Per
        # completion, the product of its tokens' ratios (the sequence's own ratio, biased only by
        # the truncation: "When Speed Kills Stability", Liu, Li et al. 2025; verl's choice), or per
        # token (Yao et al.'s first form: lower variance, biased over a sequence)
        log_w = torch.where(mask, old_logp.detach() - sampler_logp, 0.0)  # (B, T) log(pi_old / pi_sampler)
        if tis_level == "sequence":
            log_w = log_w.sum(1, keepdim=True).expand_as(logp)  # (B, T): the completion's, on each token
        elif tis_level != "token":
            raise ValueError(f"tis_level must be 'sequence' or 'token', not {tis_level!r}")
        per_token = per_token * torch.exp(log_w).clamp(max=tis)  # (B, T)
    keep = mask  # (B, T) the tokens whose policy term counts
    if top_entropy < 1:
        # the high-entropy minority (arXiv 2506.01939): the policy gradient flows only through
        # the tokens whose entropy is in the batch's top `top_entropy`; the KL through all
        if entropy_cut is None:
            entropy_cut = common.quantile(entropy[mask], 1 - top_entropy) if mask.any() else 0.0
        keep = mask & (entropy >= entropy_cut)
        per_token = torch.where(keep, per_token, 0.0)
    kl_tok = torch.zeros_like(logp)
    if beta > 0:
        d = ref_logp - logp  # (B, T) log(pi_ref / pi_theta)
        if kl == "k1":
            kl_tok = -d  # log(pi_theta / pi_ref): unbiased, can be negative
        elif kl == "k2":
            kl_tok = 0.5 * d ** 2
        elif kl == "k3":
            kl_tok = torch.exp(d) - d - 1  # DeepSeekMath's estimator: unbiased and >= 0
        else:
            raise ValueError(f"kl must be k1, k2 or k3, not {kl!r}")
        per_token = per_token + beta * kl_tok
    per_token = torch.where(mask, per_token, 0.0)  # padding and masked completions: no gradient
    n_tok = mask.sum(1)  # (B,)
    n_seq = (n_tok > 0).sum().clamp(min=1)  # completions that take part
    if agg == "seq-mean":  # GRPO: mean over each completion's tokens, then over completions
        loss = (per_token.sum(1) / n_tok.clamp(min=1)).sum() / n_seq
    elif agg == "token-mean":  # DAPO: every token of the batch weighs the same
        loss = per_token.sum() / n_tok.sum().clamp(min=1)
    elif agg == "seq-sum":  # Dr. GRPO: token sums over a constant, no length normalisation
        if not max_len:
            raise ValueError("agg 'seq-sum' needs max_len")
        loss = (per_token.sum(1) / max_len).sum() / n_seq
    else:
        raise ValueError(f"agg must be seq-mean, token-mean or seq-sum, not {agg!r}")

    with torch.no_grad():  # means over the batch's tokens
        n = mask.sum().clamp(min=1)
        mean = lambda x: (x * mask).sum() / n
        metrics = {"kl": mean(kl_tok), "ratio": mean(ratio)}
        if objective == "clip":  # the tokens the clip took the gradient from
            metrics["clip"] = mean(((ratio > 1 + clip_high) & (a > 0)) | ((ratio < 1 - clip_low) & (a < 0)))
        elif objective == "cispo":  # the tokens whose weight was cut, whatever the advantage's sign
            metrics["clip"] = mean((ratio > 1 + clip_high) | (ratio < 1 - clip_low))
        if clip_c:
            metrics["clip_c"] = mean((a < 0) & (-torch.min(ratio * a, clipped * a) > -clip_c * a))
        if sampler_logp is not None:  # the sampler against pi_old: mean |difference|, and k3's
            d = (old_logp.detach() - sampler_logp).double()  # estimate of KL(pi_sampler || pi_old), in float64:
            metrics.update(sampler_diff=mean(d.abs()), sampler_kl=mean(torch.expm1(d) - d))  # d is often ~1e-7
        if tis:  # the tokens whose weight was truncated
            metrics["tis_cut"] = mean(log_w > math.log(tis))
        if top_entropy < 1:
            metrics.update(entropy_kept=mean(keep), entropy_cut=torch.as_tensor(entropy_cut, dtype=logp.dtype))
    return loss, metrics


# ----------------------------------------------------------------------------------------
# training: each step samples, scores, computes advantages, updates, logs; then evaluates
# and saves on their cadence (the data's loading and order are in nanor1/common.py,
# sampling in nanor1/sampling.py, a step's metrics, log line and warnings in nanor1/steplog.py)


def train(args, stop=None):
    # stop: what a signal asked (common.stop_signals): "at" once the run should stop at a step's end
    stop = {} if stop is None else stop
    # under torchrun each process samples its own share of the prompts; the gradients are
    # summed across processes, so every process takes the same step; only process 0 writes
    rank, world, device, dtype = common.start_run(args)
    rewards = R.parse_rewards(args.rewards)
    rewards_names = [name for name, _, _ in rewards]
    score, checks = R.scorer(rewards), R.scorer("accuracy,format")  # training's rewards; evaluation's
    P, G = args.prompts_per_step, args.group
    Pr = P // world  # prompts per process
    num_micro = math.ceil(Pr * G / args.micro_batch_size)

    # model and data; a resumed run takes the policy (and all else) from its checkpoint
    resumed, state = checkpoints.resume_from(args.out, args.resume, vars(args), RESUME_CHECKED)
    common.check_not_finished(state, args.num_steps, resumed)
    load_on = torch.device("cpu") if args.fsdp else device  # under FSDP on the CPU until sharded
    model, tok = models.load_for_training(args.model, load_on, resumed, args.lora_rank, args.lora_alpha)
    eos = models.eos_ids(model, tok)
    need = sorted({R.NEEDS[name] for name in rewards_names if name in R.NEEDS})  # what the rewards read
    examples, prompt_ids, eval_examples, eval_ids = common.load_rl_data(args, tok, model, need)
    model, ref = models.policy_and_reference(model, args.model, device, resumed, state["ref"] if state else None,
                                             args.beta > 0 and not args.lora_rank, args.fsdp, args.grad_checkpointing)
    common.print0(f"{P} prompts x {G} completions = {P * G} per step" + (f" ({Pr} prompts in each of {world} "
                  f"processes)" if world > 1 else "") + f", {num_micro} micro-batches of {args.micro_batch_size}, "
                  f"{args.num_iterations} update(s) per step, {args.num_steps} steps on {device} in "
                  f"{str(dtype).removeprefix('torch.')}, lr {args.lr:g} {args.lr_schedule}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1000 * rank)  # own samples per process
    eval_generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # eval must not shift training
    data_state, start = {"epoch": 0, "pos": 0}, 0
    if state:
        start = checkpoints.restore_training(model, opt, state, resumed, world, args.weight_decay, args.out,
                                             ["metrics.jsonl", "samples.jsonl"])
        data_state = state["data"]

    amp = functools.partial(common.autocast, device, dtype)  # with amp(): compute in --dtype
    defaults = {"lang": args.lang, "overlong_buffer": args.overlong_buffer}  # for examples without them
    flags = vars(args)
    log, finish = common.open_run(args.out, flags, args.wandb_project, rank=rank)

    # the policy that samples: the model itself, or a bfloat16 copy refreshed after every update
    sampler = sampling.low_precision_copy(model, torch.bfloat16) if args.sample_dtype == "bfloat16" else model

    def run_eval(step):  # on process 0 only, the others going on; under FSDP every process takes part
        if rank and not args.fsdp:
            return
        with amp():
            ev = sampling.evaluate(sampler, tok, eval_examples, eval_ids, eos, eval_generator, args.eval_samples,
                                   args.max_new_tokens, args.eval_temperature, args.eval_top_p,
                                   args.prompts_per_step, defaults, common.warn0, score=checks)
        log(step, {"step": step, **ev})
        common.print0(sampling.eval_line(step, ev))

    if eval_examples and not start:
        run_eval(0)
    if state:  # last: nothing above may draw from the random streams the next step continues
        checkpoints.set_rng_state(state["rng"][rank], [generator, eval_generator])

    clock = functools.partial(common.clock, device)
    variant = {k: getattr(args, k) for k in ["ratio_level", "objective", "clip_c", "top_entropy", "sapo_tau_pos",
                                             "sapo_tau_neg", "tis", "tis_level"]}  # grpo_loss's keywords
    history, bad_steps, last_warned, stopping = [], 0, {}, False
    stop["armed"] = True  # from here a signal stops the run at the end of a step, with a checkpoint
    for step in common.progress(range(start + 1, args.num_steps + 1), desc="grpo", initial=start, total=args.num_steps):
        t0, timings = clock(), {"sample": 0.0, "score": 0.0}
        if ref is not None and args.ref_reset_every and step > 1 and (step - 1) % args.ref_reset_every == 0:
            ref.load_state_dict(model.state_dict())  # DeepSeekMath's iterative RL: new reference

        # 1. sample and score this process's share of the prompts, G completions each; with
        # dynamic sampling keep only groups with reward variance, and sample more rounds while
        # any process needs some
        sampled, batch, rounds = [], [], 0
        max_rounds = args.max_sampling_rounds if args.dynamic_sampling else 1
        while rounds < max_rounds and distributed.all_sum([len(batch) < Pr * G], device)[0]:
            rounds += 1
            idx = common.next_prompts(len(examples), data_state, P, args.seed)[rank * Pr:(rank + 1) * Pr]
            if len(batch) == Pr * G:
                continue  # this process is full; the data order still moves on with the others'
            with amp():
                rows = sampling.rollout(sampler, tok, [examples[i] for i in idx], [prompt_ids[i] for i in idx], G,
                                        args.max_new_tokens, args.temperature, args.top_p,
                                        [] if args.ignore_eos else eos, score, generator, defaults, warn=common.warn0,
                                        timings=timings, logp=True, entropy=args.top_entropy < 1)  # (Pr * G,)
            sampled += rows
            for g in range(Pr):
                group = rows[g * G:(g + 1) * G]
                informative = len({r["reward"] for r in group}) > 1
                if (informative or not args.dynamic_sampling) and len(batch) < Pr * G:
                    batch += group

        # 2. the step's metrics, over every process's samples
        record = steplog.step_metrics(step, sampled, rewards_names, G, R.scorer("accuracy"))
        if args.dynamic_sampling:
            record["rounds"], record["groups"] = rounds, int(distributed.all_sum([len(batch) // G], device)[0])

        # 3. the update: advantages per group, then --num-iterations passes over the batch in
        # micro-batches, one optimizer step each
        # the token-weighted means logged: the same keys in every process (they are summed over them)
        logged = ["kl", "ratio", "entropy", "sampler_diff", "sampler_kl"]
        for key, wanted in [("clip", args.objective in ("clip", "cispo")), ("clip_c", args.clip_c),
                            ("tis_cut", args.tis), ("entropy_kept", args.top_entropy < 1)]:
            logged += [key] if wanted else []
        sums = dict.fromkeys(logged, 0.0)
        n_tok_logged, gnorm, skipped = 0, float("nan"), False
        lr = common.lr_at(step, args.num_steps, args.lr, args.warmup_steps, args.min_lr_ratio, args.lr_schedule)
        for pg in opt.param_groups:
            pg["lr"] = lr
        # advantages from every process's groups (--scale batch divides by the std of all of them)
        everyone = distributed.all_gather([[r["reward"] for r in batch]])  # (world,) lists
        mine = sum(len(x) for x in everyone[:rank])
        adv = group_advantages(torch.tensor([x for part in everyone for x in part]), G, args.scale,
                               args.baseline)[mine:mine + len(batch)].to(device)  # (Pr * G,)
        use = [not (args.mask_truncated and r["truncated"]) for r in batch]
        # the loss of each micro-batch is weighted so that the sum over micro-batches, and over
        # processes, is the loss of the whole step's batch under the chosen aggregation
        total_tok, total_seq = distributed.all_sum([sum(len(r["completion"]) for r, u in zip(batch, use) if u),
                                               sum(use)], device)
        # sort by length so micro-batches hold completions of similar length: less padding
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]["completion"]))
        micro = [order[s:s + args.micro_batch_size] for s in range(0, len(order), args.micro_batch_size)]

        def tensors(ix):  # (b, Lp) prompts padded on the left, (b, T) completions on the right
            p_ids, p_mask, ids, mask = sampling.pad_batch([batch[i]["prompt"] for i in ix],
                                                          [batch[i]["completion"] for i in ix], tok.pad_token_id, device)
            keep = torch.tensor([use[i] for i in ix], device=device)
            return p_ids, p_mask, ids, mask * keep[:, None]  # masked-out completions: all-zero rows

        def padded(key, ix):  # (b, T) what the sampler recorded for each token, 0 past the end
            T = max(1, max(len(batch[i]["completion"]) for i in ix))
            return torch.tensor([batch[i][key] + [0.0] * (T - len(batch[i][key])) for i in ix], device=device)

        cut = None  # --top-entropy: the entropy of the batch's (1 - Q) quantile, every process's tokens
        if args.top_entropy < 1:  # (the sampler's entropies: the policy's, before this step's update)
            ents = distributed.all_gather([e for r, u in zip(batch, use) if u for e in r["entropy"]])
            cut = common.quantile(torch.tensor(ents), 1 - args.top_entropy).item() if ents else 0.0

        t_ref = clock()
        ref_logps = [None] * len(micro)
        if args.beta > 0:  # with LoRA the reference is the policy's base, adapters off: no second model
            off = model.disable_adapter() if args.lora_rank else contextlib.nullcontext()
            with torch.inference_mode(), amp(), off:
                for j, ix in enumerate(micro):
                    ref_logps[j] = completion_logprobs(model if ref is None else ref, *tensors(ix), args.temperature,
                                                         vocab=len(tok))
        t_update = clock()
        old_logps = [None] * len(micro)
        for it in range(args.num_iterations if total_seq else 0):
            opt.zero_grad(set_to_none=True)
            for j, ix in enumerate(micro):
                p_ids, p_mask, ids, mask = tensors(ix)
                with amp():
                    logp, ent = completion_logprobs(model, p_ids, p_mask, ids, mask, args.temperature,
                                                    with_entropy=True, vocab=len(tok))  # (b, T) each
                if it == 0:  # pi_old: the weights that sampled, not yet updated
                    old_logps[j] = logp.detach()
                loss, m = grpo_loss(logp, old_logps[j], ref_logps[j], adv[ix], mask, args.clip_low, args.clip_high,
                                    args.beta, args.kl, args.agg, args.max_new_tokens, **variant, entropy_cut=cut,
                                    entropy=None if cut is None else padded("entropy", ix),
                                    sampler_logp=padded("sampler_logp", ix))
                n_tok = int(mask.sum())
                share = n_tok / total_tok if args.agg == "token-mean" else int((mask.sum(1) > 0).sum()) / total_seq
                (loss * share).backward()
                for k in [k for k in sums if k != "entropy"]:  # token-weighted means
                    sums[k] += m[k].item() * n_tok
                sums["entropy"] += (ent * mask).sum().item()
                n_tok_logged += n_tok
            gnorm = common.optimizer_step(model, opt, args.grad_clip, step)  # summed over processes, clipped
            skipped = skipped or not math.isfinite(gnorm)
        if sampler is not model:  # the next rollout samples from the weights just updated
            sampling.low_precision_copy(model, torch.bfloat16, sampler)
        *totals, n_tok_logged, n_sampled = distributed.all_sum(
            [*sums.values(), n_tok_logged, sum(len(r["completion"]) for r in sampled)], device)
        for k, total in zip(sums, totals):  # None (null in the jsonl) when nothing was updated: no tokens, no ratio
            record[k] = total / n_tok_logged if n_tok_logged else None
        record.setdefault("clip", None)  # SAPO and PG have no clip
        record.update({"gnorm": gnorm if math.isfinite(gnorm) else None, "lr": lr})
        if cut is not None:
            record["entropy_cut"] = cut if n_tok_logged else None
        t_end = clock()
        record["tok/s"] = n_sampled / (t_end - t0)  # generated tokens, all processes
        # where the step's time went (process 0's): sampling, scoring, the reference's log-probs, the update
        record.update({"sample_s": timings["sample"], "score_s": timings["score"], "ref_s": t_update - t_ref,
                       "update_s": t_end - t_update, "s": t_end - t0})

        # 4. log: one line, one jsonl record, warnings, a few completions to read
        common.print0(steplog.log_line(record, args, rewards_names))
        log(step, record)
        history.append(record)
        bad_steps = bad_steps + 1 if skipped else 0
        common.stop_if_bad(bad_steps, args.max_bad_steps)
        steplog.warn_about(record, args, last_warned)
        if args.sample_every and step % args.sample_every == 0 and rank == 0:
            sampling.write_samples(os.path.join(args.out, "samples.jsonl"), step, sampled[:G])

        # 5. evaluate and save on their cadence, and at the end, or when a signal asked to stop
        last = step == args.num_steps
        stopping = not last and distributed.all_sum([float("at" in stop)], device)[0] > 0  # all stop at one step
        if eval_examples and (last or (args.eval_every and step % args.eval_every == 0)):
            run_eval(step)
        if (args.save_every and step % args.save_every == 0) or last or stopping:
            # everything the next step depends on, so that a resumed run trains exactly as this one
            # (the weights, optimizer and data order are the same in every process)
            path = checkpoints.save_training_checkpoint(
                args.out, step, model, opt, tok, flags,
                {"data": dict(data_state),
                 "ref": distributed.full_state_dict(ref) if ref is not None and args.ref_reset_every else None},
                [generator, eval_generator], args.save_total_limit, rank, args.save_optimizer)
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
