"""PPO with a value model, the baseline GRPO replaced (DeepSeekMath section 4.1, InstructGPT), in one file.

Each step: take --prompts-per-step prompts, sample --group completions of each (1 by
default: PPO's setting), score them with the same rule rewards as grpo.py, and turn each
into per-token rewards: -beta x (log pi_old - log pi_ref) on every token, the rule reward
added on the last one (DeepSeekMath eq. 2). A value model V estimates each token's return;
GAE turns rewards and values into per-token advantages, whitened over the batch; the policy
maximises PPO's clipped surrogate and the value model minimises a clipped squared error to
the returns, each with its own AdamW. grpo.py does the same with the value model replaced
by the mean reward of the prompt's own group: ppo.py exists to show what that saves.

Give the two the same number of completions per step to compare them: grpo.py's default 8
prompts x 8 completions is ppo.py's --prompts-per-step 64 --group 1 (its defaults).

The choices, and who made them:
- the value model is a copy of the policy's network without its LM head, and a scalar head
  on the last hidden state, started from the policy (verl's default; TRL and OpenRLHF start
  it from a reward model, which rule rewards do not have). Its head starts at zero: V = 0
  everywhere, so the first advantages are the returns themselves;
- V(s_t) is read at the position before token t (the prompt and the tokens before t);
- GAE with --gamma 1 (every peer: the reward is the answer's, a discount only shortens
  answers) and --lam 1 (verl's default; TRL's and OpenRLHF's is 0.95). With the reward on
  the last token alone and lambda < 1, the reward reaches token t of a T-token answer
  damped by lam^(T-t) (0.95^50 = 0.08), the rest of token t's advantage coming from the
  value model's estimates: an untrained value model then decides the early tokens'
  advantages. VC-PPO (arXiv 2503.01491) finds these two, the value model's initial bias and
  the decay of the reward, behind PPO's collapse on long reasoning, and fixes them by
  pretraining the value model and giving it lambda = 1. Without pretraining, lambda = 1
  for both: A_t = return - V(s_t), the value model a per-token baseline that biases nothing
  (docs/ppo.md: at 0.95 the miniature's runs collapse);
- the KL in the reward is the k1 estimate log(pi_old / pi_ref) (InstructGPT, TRL, verl's
  default), whose sum over an answer is an unbiased estimate of the sequence's KL; no KL
  term in the loss (GRPO puts k3 there instead);
- advantages are whitened over the whole step's tokens, every process's (verl; TRL
  whitens each process's own), returns are not; both losses are token means over the
  batch (TRL, verl);
- the value loss is 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) with
  c = --value-clip (TRL and OpenRLHF 0.2, verl 0.5); the policy's and the value model's
  updates are separate (two models, two optimizers, --lr and --critic-lr): no vf_coef;
- --ppo-epochs passes over the batch, one optimizer step for each model per pass (TRL 4,
  verl and OpenRLHF 1). Default 1, as grpo.py's --num-iterations: the comparison then
  changes the baseline alone. With one pass V = V_old and pi = pi_old in value, so neither
  clip acts: they do from the second pass on;
- --critic-warmup N: the first N steps train the value model alone (verl's critic_warmup).

Deliberate simplifications: no mini-batches within a pass (one optimizer step per pass, as
grpo.py); pi_old is the first pass's own log-probs at --beta 0 (the weights have not moved
yet), a forward pass of its own when the KL reward needs them before the update; one
process or plain data parallelism under torchrun (as grpo.py: whole models in every
process, gradients summed once per update, evaluation on process 0); no --fsdp or
--lora-rank (refused); the value model and its optimizer are saved in the checkpoint's
trainer_state.pt, for --resume, not as a model of their own.

    python ppo.py --model Qwen2.5-0.5B --data data/gsm8k/train.jsonl --prompts-per-step 64
    python ppo.py --model out/tiny --data train.jsonl --device cpu --max-new-tokens 64
    torchrun --nproc_per_node 8 ppo.py --model Qwen2.5-1.5B --prompts-per-step 512 --data ...

Ctrl-C (or SIGTERM) stops a run at the end of its step with a checkpoint; the same command
plus --resume goes on exactly (bitwise on CPU: tests/test_ppo.py), value model included.
"""

import argparse
import copy
import functools
import math
import os
import sys

import torch

import rewards as R
from nanor1 import checkpoints, common, distributed, models, sampling, steplog
from nanor1.logprobs import completion_logprobs

# flags whose change on --resume makes the run differ from an uninterrupted one (a warning names them)
RESUME_CHECKED = ["model", "data", "template", "seed", "lr", "critic_lr", "weight_decay", "warmup_steps", "grad_clip",
                  "prompts_per_step", "group", "temperature", "top_p", "rewards", "beta", "gamma", "lam", "clip_low",
                  "clip_high", "value_clip", "ppo_epochs", "critic_warmup", "lr_schedule", "min_lr_ratio"]


def get_args(argv=None):
    p = common.short_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    # model
    p.add_argument("--model", default="Qwen2.5-0.5B", help="local folder, hub id, or short name (Qwen2.5-0.5B); "
                                                           "the value model starts as a copy of it")
    p.add_argument("--template", default="r1", choices=["r1", "chat", "raw"],
                   help="prompt format: R1-Zero plain-text template, tokenizer chat template, or the prompt as is")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (weights and optimizer stay float32); auto = bfloat16 on CUDA, else float32")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward to save memory (policy and value model)")
    p.add_argument("--lora-rank", type=int, default=0, help="not offered by ppo.py (grpo.py has it); 0")
    p.add_argument("--fsdp", action="store_true", help="not offered by ppo.py (grpo.py has it)")
    # data
    p.add_argument("--data", required=True, help="training prompts, jsonl with 'prompt' and 'answer'")
    p.add_argument("--eval-data", default=None, help="held-out jsonl for --eval-every")
    # sampling
    p.add_argument("--group", type=int, default=1, help="completions per prompt (PPO: 1; more are single samples too)")
    p.add_argument("--prompts-per-step", type=int, default=64,
                   help="prompts per step; P x group completions per step (grpo.py's 8 x 8 = 64 x 1)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="completion length limit, tokens; default 1024, or what the context leaves when less")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off")
    # rewards
    p.add_argument("--rewards", default="accuracy,format",
                   help="comma list of rewards.py names with optional :weight, e.g. accuracy,format:0.5,language:0.1")
    p.add_argument("--lang", default="en", help="target language of the language reward for examples without 'lang'")
    p.add_argument("--overlong-buffer", type=int, default=None,
                   help="tokens before --max-new-tokens where the overlong penalty starts; default a fifth")
    # PPO
    p.add_argument("--beta", type=float, default=0.04,
                   help="KL penalty in the reward: -beta log(pi_old / pi_ref) on every token; 0 = no reference model")
    p.add_argument("--gamma", type=float, default=1.0, help="GAE discount per token, in (0, 1]")
    p.add_argument("--lam", type=float, default=1.0, help="GAE lambda, in [0, 1] (verl: 1; TRL, OpenRLHF: 0.95)")
    p.add_argument("--clip-low", type=float, default=0.2, help="ratio clipped below at 1 - clip-low")
    p.add_argument("--clip-high", type=float, default=0.2, help="ratio clipped above at 1 + clip-high")
    p.add_argument("--value-clip", type=float, default=0.2,
                   help="a value moves at most this far from its value before the step (TRL 0.2, verl 0.5); 0 = off")
    p.add_argument("--ppo-epochs", type=int, default=1,
                   help="passes over each batch, one optimizer step per pass for each model (TRL: 4)")
    p.add_argument("--critic-lr", type=float, default=1e-5, help="the value model's AdamW learning rate (verl: 1e-5)")
    p.add_argument("--critic-warmup", type=int, default=0, help="the first N steps train the value model alone")
    # optimisation
    p.add_argument("--num-steps", type=int, default=100, help="training steps (one sampling round + updates each)")
    p.add_argument("--lr", type=float, default=1e-6, help="the policy's AdamW learning rate")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "linear", "cosine"],
                   help="both learning rates after the warm-up: constant, or a decay to --min-lr-ratio x at the last step")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="with a decay: the last step's learning rate / its start")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up of both models, steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of both models")
    p.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop after this many steps in a row skipped for a non-finite loss or gradient; 0 = never")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm of each model; 0 = no clipping")
    p.add_argument("--micro-batch-size", type=int, default=8, help="completions per forward/backward pass")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and init")
    # evaluation
    p.add_argument("--eval-every", type=int, default=0, help="evaluate on --eval-data every N steps; with --eval-data it also runs at start and end")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per eval prompt, k of pass@1")
    p.add_argument("--eval-prompts", type=int, default=0, help="eval prompts used; 0 = all")
    p.add_argument("--eval-temperature", type=float, default=0.6, help="eval sampling temperature (R1: 0.6); 0 = greedy")
    p.add_argument("--eval-top-p", type=float, default=0.95, help="eval nucleus mass (R1: 0.95)")
    # logging and output
    p.add_argument("--out", default="out/ppo", help="output folder: metrics.jsonl, samples.jsonl, checkpoints")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps, and at the end; 0 = only at the end")
    p.add_argument("--save-total-limit", type=int, default=0, help="keep only the newest N checkpoints; 0 = all")
    p.add_argument("--save-optimizer", type=int, default=1, choices=[0, 1],
                   help="0: checkpoints hold the policy alone (no optimizers, no value model): not resumable")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run exactly: alone, from the newest checkpoint of --out; or from the checkpoint "
                        "folder given. --model stays the reference model's starting point")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run: its files go first")
    p.add_argument("--sample-every", type=int, default=10, help="write a step's first completions every N steps; 0 = never")
    p.add_argument("--wandb-project", default=None, help="also log to this wandb project (wandb is optional)")
    args = p.parse_args(argv)

    # contradictions fail here, naming the flag, before any model is loaded
    if args.fsdp or args.lora_rank:
        p.error(f"--{'fsdp' if args.fsdp else 'lora-rank'}: not offered by ppo.py (the value model would need its "
                "own sharding or adapters); grpo.py has it")
    common.check_ranges(p, args, ["num_steps", "prompts_per_step", "group", "max_new_tokens", "ppo_epochs",
                                  "micro_batch_size", "eval_samples"],
                        ["warmup_steps", "eval_every", "eval_prompts", "save_every", "save_total_limit", "sample_every",
                         "max_bad_steps", "critic_warmup", "lr", "critic_lr", "weight_decay", "grad_clip", "beta",
                         "clip_low", "clip_high", "value_clip", "eval_temperature"])
    if not 0 < args.gamma <= 1:
        p.error("--gamma must be in (0, 1]")
    if not 0 <= args.lam <= 1:
        p.error("--lam must be in [0, 1]")
    if args.temperature <= 0:
        p.error("--temperature must be > 0: log-probs divide by it")
    if not 0 < args.top_p <= 1 or not 0 < args.eval_top_p <= 1:
        p.error("--top-p and --eval-top-p must be in (0, 1]")
    if args.critic_warmup >= args.num_steps:
        p.error(f"--critic-warmup {args.critic_warmup} leaves none of the {args.num_steps} steps (--num-steps) to the policy")
    if (args.eval_every or args.eval_prompts) and not args.eval_data:
        p.error("--eval-every and --eval-prompts need --eval-data")
    try:
        R.parse_rewards(args.rewards)
    except ValueError as e:
        p.error(f"--rewards: {e}")
    if args.lang not in R.SCRIPTS:
        p.error(f"--lang: unknown language '{args.lang}' (known: {', '.join(sorted(R.SCRIPTS))})")
    if args.overlong_buffer is not None and args.overlong_buffer < 0:
        p.error("--overlong-buffer must be 0 or more")
    if args.resume and args.overwrite:
        p.error("--resume goes on with the run in --out, --overwrite removes it: pick one")
    if not 0 <= args.min_lr_ratio <= 1:
        p.error("--min-lr-ratio must be in [0, 1]")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.prompts_per_step % world:
        p.error(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes")
    return args


# ----------------------------------------------------------------------------------------
# the algorithm


class ValueModel(torch.nn.Module):
    """V(s_t): the policy's network without its LM head, and a scalar head on the last hidden state."""

    def __init__(self, policy):
        super().__init__()
        self.body = copy.deepcopy(policy.base_model)  # embeddings, layers, final norm: the policy's weights
        self.head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # V = 0 everywhere at the start
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, prompt_ids, prompt_mask, ids, mask):
        """Left-padded prompts (B, Lp), right-padded completions (B, T) -> values (B, T), 0 on padding:
        the value of the state before completion token t (the prompt and tokens < t)."""
        input_ids = torch.cat([prompt_ids, ids], dim=1)  # (B, Lp + T)
        attn = torch.cat([prompt_mask, mask], dim=1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        h = self.body(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
        h = h[:, prompt_ids.shape[1] - 1:-1]  # (B, T, H): position Lp - 1 + t has seen tokens < t
        with torch.autocast(h.device.type, enabled=False):  # values, returns, advantages in float32, also under bf16
            return self.head(h.float()).squeeze(-1).masked_fill(mask == 0, 0.0)  # (B, T)


def token_rewards(score, old_logp, ref_logp, mask, beta):
    """Per-token rewards (B, T): -beta log(pi_old / pi_ref) on every token (k1), and the rule
    reward score (B,) added on each completion's last token. old_logp, ref_logp: None at beta 0."""
    mask = mask.float()
    r = -beta * (old_logp - ref_logp) * mask if beta else torch.zeros_like(mask)  # (B, T)
    n = mask.sum(1).long()  # (B,) completion lengths
    rows = torch.nonzero(n > 0).squeeze(1)
    r[rows, n[rows] - 1] += score[rows].to(r.dtype)
    return r


def gae(rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalised advantage estimation (Schulman et al., arXiv 1506.02438) -> (advantages, returns), (B, T).

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t), with V = 0 after the last token (the answer is
    over); A_t = delta_t + gamma lam A_{t+1} = sum_l (gamma lam)^l delta_{t+l}; returns
    R_t = A_t + V(s_t), the value model's target. rewards, values, mask: (B, T), completions
    padded on the right. At gamma = lam = 1: A_t = (sum of rewards from t on) - V(s_t).
    """
    values = values.to(torch.promote_types(values.dtype, torch.float32)) * mask  # float64 stays float64
    mask = mask.to(values.dtype)
    adv = torch.zeros_like(values)  # (B, T)
    running = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)  # 0 past a completion's end
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]  # padding: 0, so the last token sees A_{t+1} = 0
        adv[:, t] = running
    return adv, (adv + values) * mask


def whiten(x, mask, device):
    """(x - mean) / std over the tokens of mask, every process's -> x whitened, 0 on padding.
    std is the unbiased one; each process may hold a different number of tokens."""
    m = mask.bool()
    n, s, ss = distributed.all_sum([m.sum().item(), x[m].sum().item(), (x[m].double() ** 2).sum().item()], device)
    mean = s / max(n, 1)
    var = (ss - n * mean ** 2) / max(n - 1, 1)
    return torch.where(m, (x - mean) / math.sqrt(max(var, 0.0) + 1e-8), 0.0)


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.2):
    """PPO's clipped surrogate, negated -> (loss, metrics), a token mean over the batch.
    logp (with grad), old_logp, adv, mask: (B, T); each token has its own advantage."""
    mask = mask.bool()
    ratio = torch.exp(logp - old_logp.detach())  # (B, T)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    n = mask.sum().clamp(min=1)
    loss = torch.where(mask, per_token, 0.0).sum() / n
    with torch.no_grad():
        clipped = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
        metrics = {"ratio": (ratio * mask).sum() / n, "clip": (clipped & mask).sum() / n}
    return loss, metrics


def value_loss(values, old_values, returns, mask, clip=0.2):
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), a token mean -> (loss, metrics).
    values (with grad), old_values (before this step's updates), returns, mask: (B, T). clip 0: plain squared error."""
    mask = mask.bool()
    err = (values - returns) ** 2  # (B, T)
    if clip:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    n = mask.sum().clamp(min=1)
    loss = 0.5 * torch.where(mask, err, 0.0).sum() / n
    with torch.no_grad():  # the tokens whose clipped error was the larger one: no gradient there (TRL's vf_clipfrac)
        cut = (clipped - returns) ** 2 > (values - returns) ** 2 if clip else torch.zeros_like(mask)
        metrics = {"vclip": (cut & mask).sum() / n, "value": (values * mask).sum() / n}
    return loss, metrics


# ----------------------------------------------------------------------------------------
# training: each step samples, scores, computes rewards, values and advantages, updates the
# policy and the value model, logs; then evaluates and saves on their cadence (sampling,
# checkpoints, the log line and the data are grpo.py's, from nanor1/)


def train(args, stop=None):
    stop = {} if stop is None else stop
    rank, world, device, dtype = common.start_run(args)
    rewards = R.parse_rewards(args.rewards)
    rewards_names = [name for name, _, _ in rewards]
    score, checks = R.scorer(rewards), R.scorer("accuracy,format")  # training's rewards; evaluation's
    P, G = args.prompts_per_step, args.group
    Pr = P // world  # prompts per process

    # model, value model and data; a resumed run takes both models (and all else) from its checkpoint
    resumed, state = checkpoints.resume_from(args.out, args.resume, vars(args), RESUME_CHECKED)
    common.check_not_finished(state, args.num_steps, resumed)
    model, tok = models.load_for_training(args.model, device, resumed)
    eos = models.eos_ids(model, tok)
    need = sorted({R.NEEDS[name] for name in rewards_names if name in R.NEEDS})
    examples, prompt_ids, eval_examples, eval_ids = common.load_rl_data(args, tok, model, need)
    model, ref = models.policy_and_reference(model, args.model, device, resumed, None, args.beta > 0,
                                             grad_checkpointing=args.grad_checkpointing)
    critic = ValueModel(model).to(device).train()
    if args.grad_checkpointing:
        models.enable_grad_checkpointing(critic.body)
    count = lambda m: sum(p.numel() for p in m.parameters())
    common.print0(f"{P} prompts x {G} completions = {P * G} per step" + (f" ({Pr} prompts in each of {world} "
                  f"processes)" if world > 1 else "") + f", {args.ppo_epochs} pass(es) per step, {args.num_steps} "
                  f"steps on {device} in {str(dtype).removeprefix('torch.')}; policy {count(model) / 1e6:.1f}M "
                  f"parameters, value model {count(critic) / 1e6:.1f}M, lr {args.lr:g} and {args.critic_lr:g}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
    generator = torch.Generator(device=device).manual_seed(args.seed + 1000 * rank)
    eval_generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    data_state, start = {"epoch": 0, "pos": 0}, 0
    if state:
        start = checkpoints.restore_training(model, opt, state, resumed, world, args.weight_decay, args.out,
                                             ["metrics.jsonl", "samples.jsonl"])
        critic.load_state_dict(state["critic"])
        critic_opt.load_state_dict(state["critic_optimizer"])
        for group in critic_opt.param_groups:
            group["weight_decay"] = args.weight_decay
        data_state = state["data"]

    amp = functools.partial(common.autocast, device, dtype)
    defaults = {"lang": args.lang, "overlong_buffer": args.overlong_buffer}
    flags = vars(args)
    log, finish = common.open_run(args.out, flags, args.wandb_project, rank=rank)

    def run_eval(step):  # on process 0 only
        if rank:
            return
        with amp():
            ev = sampling.evaluate(model, tok, eval_examples, eval_ids, eos, eval_generator, args.eval_samples,
                                   args.max_new_tokens, args.eval_temperature, args.eval_top_p,
                                   args.prompts_per_step, defaults, common.warn0, score=checks)
        log(step, {"step": step, **ev})
        common.print0(sampling.eval_line(step, ev))

    if eval_examples and not start:
        run_eval(0)
    if state:  # last: nothing above may draw from the random streams the next step continues
        checkpoints.set_rng_state(state["rng"][rank], [generator, eval_generator])

    clock = functools.partial(common.clock, device)
    history, bad_steps, last_warned, stopping = [], 0, {}, False
    stop["armed"] = True
    for step in common.progress(range(start + 1, args.num_steps + 1), desc="ppo", initial=start, total=args.num_steps):
        t0, timings = clock(), {"sample": 0.0, "score": 0.0}

        # 1. sample and score this process's share of the prompts
        idx = common.next_prompts(len(examples), data_state, P, args.seed)[rank * Pr:(rank + 1) * Pr]
        with amp():
            batch = sampling.rollout(model, tok, [examples[i] for i in idx], [prompt_ids[i] for i in idx], G,
                                     args.max_new_tokens, args.temperature, args.top_p, eos, score, generator,
                                     defaults, warn=common.warn0, timings=timings)  # (Pr * G,)
        record = steplog.step_metrics(step, batch, rewards_names, G, R.scorer("accuracy"))

        # 2. before any update: pi_old and the reference's log-probs, the values, then the
        # per-token rewards, GAE and the whitened advantages, in length-sorted micro-batches
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]["completion"]))
        micro = [order[s:s + args.micro_batch_size] for s in range(0, len(order), args.micro_batch_size)]
        tensors = [sampling.pad_batch([batch[i]["prompt"] for i in ix], [batch[i]["completion"] for i in ix],
                                      tok.pad_token_id, device) for ix in micro]  # (b, Lp), (b, Lp), (b, T), (b, T)
        total_tok = distributed.all_sum([sum(len(r["completion"]) for r in batch)], device)[0]
        t_ref = clock()
        old_logps, ref_logps = [None] * len(micro), [None] * len(micro)
        if args.beta > 0:  # the KL reward needs pi_old's log-probs before the update: a forward of its own
            with torch.no_grad(), amp():
                for j, x in enumerate(tensors):
                    old_logps[j] = completion_logprobs(model, *x, args.temperature, vocab=len(tok))
                    ref_logps[j] = completion_logprobs(ref, *x, args.temperature, vocab=len(tok))
        t_values = clock()
        with torch.no_grad(), amp():
            old_values = [critic(*x) for x in tensors]  # (b, T) each
        advs, returns = [], []
        fit = [0.0] * 5  # sums over tokens of R, R^2, R - V, (R - V)^2 (the value model's fit) and the KL
        for j, (ix, (_, _, _, mask)) in enumerate(zip(micro, tensors)):
            score_t = torch.tensor([batch[i]["reward"] for i in ix], dtype=torch.float32, device=device)  # (b,)
            r = token_rewards(score_t, old_logps[j], ref_logps[j], mask, args.beta)  # (b, T)
            a, ret = gae(r, old_values[j], mask, args.gamma, args.lam)
            advs.append(a)
            returns.append(ret)
            m, err = mask.bool(), ret - old_values[j]
            kl = (old_logps[j] - ref_logps[j])[m].sum().item() if args.beta > 0 else 0.0
            fit = [f + x for f, x in zip(fit, [ret[m].sum().item(), (ret[m] ** 2).sum().item(), err[m].sum().item(),
                                               (err[m] ** 2).sum().item(), kl])]
        # whitened over every token of the step, in every process: one mean and std for the whole batch
        T_max = max(a.shape[1] for a in advs)
        pad = lambda x: torch.nn.functional.pad(x, (0, T_max - x.shape[1]))
        flat_adv = whiten(torch.cat([pad(a) for a in advs]), torch.cat([pad(x[3]) for x in tensors]), device)
        advs = [w[:, :a.shape[1]] for w, a in zip(flat_adv.split([len(ix) for ix in micro]), advs)]

        # 3. the value model: --ppo-epochs passes, a clipped squared error to the returns
        lr_scale = common.lr_at(step, args.num_steps, 1.0, args.warmup_steps, args.min_lr_ratio, args.lr_schedule)
        for pg in critic_opt.param_groups:
            pg["lr"] = args.critic_lr * lr_scale
        sums = dict.fromkeys(["vloss", "vclip", "value"], 0.0)
        vgnorm, skipped = float("nan"), False
        for _ in range(args.ppo_epochs):
            critic_opt.zero_grad(set_to_none=True)
            for j, x in enumerate(tensors):
                with amp():
                    v = critic(*x)  # (b, T)
                loss, m = value_loss(v, old_values[j], returns[j], x[3], args.value_clip)
                n_tok = int(x[3].sum())
                (loss * n_tok / total_tok).backward()
                for k, val in [("vloss", loss), ("vclip", m["vclip"]), ("value", m["value"])]:
                    sums[k] += val.item() * n_tok / args.ppo_epochs
            vgnorm = common.optimizer_step(critic, critic_opt, args.grad_clip, step)
            skipped = skipped or not math.isfinite(vgnorm)
        t_update = clock()

        # 4. the policy: --ppo-epochs passes of the clipped surrogate (none during --critic-warmup)
        lr = args.lr * lr_scale
        for pg in opt.param_groups:
            pg["lr"] = lr
        for k in ["ratio", "clip", "entropy"]:
            sums[k] = 0.0
        gnorm, n_logged = float("nan"), 0
        for _ in range(args.ppo_epochs if step > args.critic_warmup else 0):
            opt.zero_grad(set_to_none=True)
            for j, x in enumerate(tensors):
                with amp():
                    logp, ent = completion_logprobs(model, *x, args.temperature, with_entropy=True,
                                                    vocab=len(tok))  # (b, T) each
                if old_logps[j] is None:  # at beta 0, pi_old is the first pass's own: the weights that sampled
                    old_logps[j] = logp.detach()
                loss, m = policy_loss(logp, old_logps[j], advs[j], x[3], args.clip_low, args.clip_high)
                n_tok = int(x[3].sum())
                (loss * n_tok / total_tok).backward()
                for k, val in [("ratio", m["ratio"]), ("clip", m["clip"]), ("entropy", (ent * x[3]).sum() / max(n_tok, 1))]:
                    sums[k] += val.item() * n_tok
                n_logged += n_tok
            gnorm = common.optimizer_step(model, opt, args.grad_clip, step)
            skipped = skipped or not math.isfinite(gnorm)
        t_end = clock()

        # 5. the step's record: every process's token-weighted means, the value model's fit, the times
        *totals, n_logged, n_sampled = distributed.all_sum([*sums.values(), *fit, n_logged,
                                                            sum(len(r["completion"]) for r in batch)], device)
        for k, total in zip(sums, totals):  # the value model's over the batch's tokens, the policy's over its passes'
            per = n_logged if k in ("ratio", "clip", "entropy") else total_tok
            record[k] = total / per if per else None
        s_r, ss_r, s_e, ss_e, s_kl = totals[len(sums):]
        var_r, var_e = ss_r / total_tok - (s_r / total_tok) ** 2, ss_e / total_tok - (s_e / total_tok) ** 2
        record["ev"] = 1 - var_e / var_r if var_r > 0 else None  # explained variance: 1 = V predicts the returns
        record.update({"kl": s_kl / total_tok, "gnorm": gnorm if math.isfinite(gnorm) else None,
                       "vgnorm": vgnorm if math.isfinite(vgnorm) else None, "lr": lr,
                       "critic_lr": args.critic_lr * lr_scale, "tok/s": n_sampled / (t_end - t0)})
        # where the step's time went (process 0's): sampling, scoring, pi_old's and the reference's
        # log-probs, the value model (its values before the update, and its update), the policy's update
        record.update({"sample_s": timings["sample"], "score_s": timings["score"], "ref_s": t_values - t_ref,
                       "critic_s": t_update - t_values, "update_s": t_end - t_update, "s": t_end - t0})

        # 6. log, evaluate and save, as grpo.py
        common.print0(steplog.log_line(record, args, rewards_names, [("vloss", ".4f"), ("ev", ".2f"),
                                                                     ("vgnorm", ".3f")]))
        log(step, record)
        history.append(record)
        bad_steps = bad_steps + 1 if skipped else 0
        common.stop_if_bad(bad_steps, args.max_bad_steps)
        steplog.warn_about(record, args, last_warned)
        if args.sample_every and step % args.sample_every == 0 and rank == 0:
            sampling.write_samples(os.path.join(args.out, "samples.jsonl"), step, batch[:8])
        last = step == args.num_steps
        stopping = not last and distributed.all_sum([float("at" in stop)], device)[0] > 0
        if eval_examples and (last or (args.eval_every and step % args.eval_every == 0)):
            run_eval(step)
        if (args.save_every and step % args.save_every == 0) or last or stopping:
            path = checkpoints.save_training_checkpoint(
                args.out, step, model, opt, tok, flags,
                {"data": dict(data_state), "critic": critic.state_dict(), "critic_optimizer": critic_opt.state_dict()},
                [generator, eval_generator], args.save_total_limit, rank, args.save_optimizer)
        if stopping:
            common.stopped(step, path, flags)
            break
    finish()
    distributed.end_distributed()
    if stopping:
        sys.exit(130)
    return history


def main(argv=None):
    args = get_args(argv)
    with common.user_errors(), common.stop_signals() as stop:
        return train(args, stop)


if __name__ == "__main__":
    main()
