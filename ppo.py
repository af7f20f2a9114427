"""RLHF with PPO: policy, reference, reward and value models; GAE; a KL penalty in the reward.

The objective is the KL-regularised reward of RLHF (Ziegler et al. 2019, Eq. 2,
https://arxiv.org/abs/1909.08593; Ouyang et al. 2022, InstructGPT, Eq. 2,
https://arxiv.org/abs/2203.02155): maximise the reward of sampled responses while staying close to
the reference policy,

    max_θ E_{x, y ~ π_θ}[ r_φ(x, y) ] - β KL[ π_θ(·|x) || π_ref(·|x) ],

optimised with PPO's clipped surrogate (Schulman et al. 2017, Eq. 7,
https://arxiv.org/abs/1707.06347) on per-token advantages from a learned value function. Each
response token is an action; the per-token reward is the KL penalty -β (log π_old - log π_ref) (the
k1 estimate) at every token, plus the sequence's score at the last token. Advantages come from GAE
(Schulman et al. 2016, Eq. 16, https://arxiv.org/abs/1506.02438; γ = 1, λ = 0.95) and are whitened
over the batch.

The implementation details that make PPO work for language models are each named in a comment where
they happen, tagged [detail: its name]: the names of Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO" (https://arxiv.org/abs/2403.17031), and, for the details every PPO has
(value clipping, gradient clipping, advantage whitening), of Huang et al. 2022, "The 37
Implementation Details of Proximal Policy Optimization"
(https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/).

The score is a reward model's, trained by reward_model.py (--reward_model), or the verifiable reward
of grpo.py (--reward verifiable: 1[correct \\boxed{} answer] + 0.2 x 1[a \\boxed{} answer],
tasks.py), or a user's rule function. The value model starts as the reward model (its head predicts
the final score) or, without one, as the policy with a new scalar head. With LoRA (--lora_r) the
reference is the policy with its adapter switched off (one model in memory, not two), and the value
model trains an adapter and its whole head.

How this deviates from TRL's PPOTrainer: the KL and entropy are logged per token, and
`objective/entropy` is the entropy of the policy's distribution (TRL logs the NLL of the sampled
tokens under that name). The responses can be sampled by a vLLM engine (--use_vllm, which TRL's
PPOTrainer lacks); π_old is always the trainer's own log-probs of them, and the sampler's enter only
as grpo.py's importance weight min(π_old / π_sampler, C) on the policy term (on by default, for
every sampler: common.sampler_weights; 1 to rounding in fp32). The value loss is not weighted.

    python ppo.py --model out/sft --reward_model out/reward_model  # after sft.py, reward_model.py
    python ppo.py --model out/sft --reward verifiable     # the built-in task's exact reward
    torchrun --nproc_per_node=2 ppo.py ...                # DDP, same code path
    torchrun --nproc_per_node=2 ppo.py ... --fsdp         # FSDP2: weights, grads, AdamW sharded
"""
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

import common
import tasks
from plumbing import data, engine, models, runs
from plumbing.args import (POSITIVE, Sampling, Shared, arg, at_least, between, check_args, default,
                           parse_args)
from plumbing.errors import Diverged, UserError


@dataclass
class Args(Sampling, Shared):
    # ---- PPO -------------------------------------------------------------------------------------
    kl_coef: float = arg(0.05, "β of the per-token KL penalty (initial value with --target_kl)")
    target_kl: Optional[float] = arg(None, "turn on the adaptive KL controller (Ziegler et al. "
                                     "2019) with this target of the summed per-response KL")
    kl_horizon: int = arg(10000, "horizon of the adaptive KL controller, in responses")
    kl_estimator: str = arg("k1", "the per-token KL in the reward, x = log π_old/π_ref: k1 (x) or "
                            "k3 (e^-x - 1 + x: never negative, lower variance); as TRL's")
    gamma: float = arg(1.0, "discount of GAE")
    lam: float = arg(0.95, "λ of GAE")
    cliprange: float = arg(0.2, "ε of the clipped policy ratio")
    cliprange_value: float = arg(0.2, "clip of the value update around the old values")
    vf_coef: float = arg(0.1, "weight of the value loss")
    whiten_rewards: bool = arg(False, "whiten the per-token rewards over the batch before GAE")
    num_ppo_epochs: int = arg(2, "passes over each sampled batch (TRL: 4)")
    num_mini_batches: int = arg(1, "optimizer updates per PPO epoch: the batch is shuffled and "
                                "split into this many")
    missing_eos_penalty: float = arg(1.0, "subtracted from the score of a response that never "
                                     "stopped (no end of turn or EOS)")
    value_learning_rate: Optional[float] = arg(None, "peak learning rate of the value model "
                                               "(default: --learning_rate, as TRL; OpenRLHF gives "
                                               "the critic its own)")
    value_warmup_steps: int = arg(0, "first steps that train only the value model, so that the "
                                  "policy's first advantages do not come from an untrained value "
                                  "head")
    # ---- the reward and the value model ----------------------------------------------------------
    reward: str = arg("model", "model (score responses with --reward_model), verifiable "
                      "(1[correct \\boxed{} answer] + --format_weight x 1[a \\boxed{} answer]), or "
                      "a rule path/to/file.py:function, called as TRL calls a reward function "
                      "(prompts=, completions=, completion_ids=, every dataset column, **kwargs)")
    reward_model: Optional[str] = arg(None, "a reward_model.py output folder (same tokenizer as "
                                      "the policy)")
    value_model: Optional[str] = arg(None, "initial value model: default the reward model, or "
                                     "without one the policy with a new scalar head")
    format_weight: float = arg(0.2, "λ_fmt of the verifiable reward")
    reward_timeout: float = arg(120.0, "seconds a call of a --reward path/to/file.py:function may "
                                "take; one that runs longer is stopped and its responses score 0, "
                                "counted as failures (0: no limit)")
    # ---- sampling and evaluation -----------------------------------------------------------------
    temperature: float = arg(0.7, "sampling temperature (TRL's default); every log-prob uses "
                             "logits / temperature")
    top_p: float = arg(1.0, "nucleus sampling")
    max_new_tokens: int = arg(96, "length limit of a response")
    max_prompt_length: int = arg(512, "prompts with more tokens than this are dropped (and "
                                 "counted)")
    generation_batch_size: int = arg(64, "responses sampled together in one generate call (KV "
                                     "cache)")
    grader: str = arg("exact", "how answers are graded: exact (numbers exactly) or math_verify "
                      "(also equal as mathematics, by the math-verify library: pip install "
                      "math-verify)")
    log_completions_every: int = arg(10, "write the sampled completions of every this many steps "
                                     "to <output_dir>/completions.jsonl (prompt, response, score, "
                                     "KL to the reference); 0: off")
    num_completions_to_print: int = arg(1, "of those, how many to print in the log")
    # ---- the shared arguments (plumbing/args.py) with this script's defaults ---------------------
    dataset: str = arg("arithmetic", "prompts: built-in task name, local "
                       ".jsonl/.json/.parquet/.csv, or Hub id; comma-separated for a mixture. Rows "
                       "need a `prompt` or `question`; an `answer` for accuracy")
    eval_size: int = arg(64, "held-out prompts answered greedily to measure accuracy with the "
                         "verifiable grader; 0: off")
    output_dir: str = default("out/ppo")
    batch_size: int = arg(16, "prompts per step over all ranks, one response each")
    micro_batch_size: int = arg(16, "responses per forward/backward pass")
    learning_rate: float = arg(3e-6, "peak learning rate (AdamW) of the policy")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (policy and value together)")

    def __post_init__(self):
        check_args(self, micro_batch_size=at_least(1), kl_coef=at_least(0),
                   value_warmup_steps=at_least(0), value_learning_rate=POSITIVE,
                   gamma=between(0, 1), lam=between(0, 1), cliprange=POSITIVE,
                   cliprange_value=POSITIVE, vf_coef=at_least(0), target_kl=POSITIVE,
                   kl_horizon=at_least(1), reward_timeout=at_least(0))
        if self.kl_estimator not in ("k1", "k3"):
            raise UserError(f"--kl_estimator {self.kl_estimator}: choose k1 or k3")
        if self.reward == "model" and not self.reward_model:
            raise UserError("--reward model needs --reward_model PATH (a reward_model.py output), "
                            "or use --reward verifiable")


# --------------------------------------------------------------------------------------------------
# The algorithm: per-token rewards, GAE, whitening, the clipped losses. Pure functions of tensors.
def per_token_rewards(scores, logp, ref_logp, mask, kl_coef, estimator="k1"):
    """[detail: per-token KL penalty] -β (log π_old - log π_ref) at every response token (k1), and
    the sequence score is added at the LAST real token of each response. scores: (N,); logp,
    ref_logp, mask: (N, T) right-padded responses. Returns (N, T) rewards (0 on padding) and the
    (N, T) per-token KL. estimator k3: e^-x - 1 + x of x = log π_old/π_ref, also an unbiased
    estimate of the KL, never negative (Schulman 2020, http://joschu.net/blog/kl-approx.html). The
    KL is a reward here, not a loss term: no gradient flows through it, so the two differ only in
    variance (TRL's kl_estimator)."""
    x = logp - ref_logp
    kl = (x if estimator == "k1" else torch.exp(-x) - 1 + x) * mask
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(1)  # the index of each response's last token
    rewards[torch.arange(len(scores), device=mask.device), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over response tokens (Schulman et al. 2016, Eq. 16,
    https://arxiv.org/abs/1506.02438), without a loop over time: δ_t = r_t + γ V_{t+1} - V_t (V = 0
    past the last token) and A_t = Σ_{k≥t} (γλ)^{k-t} δ_k, an upper-triangular (T, T) discount
    matrix applied to δ. rewards, values, mask: (N, T), right-padded. Returns (advantages, returns),
    returns = A + V, both 0 on padding."""
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    delta = (rewards + gamma * next_values - values) * mask  # (N, T)
    T = rewards.shape[1]
    k = torch.arange(T, device=rewards.device, dtype=torch.float64)
    power = k[None, :] - k[:, None]  # power[t, j] = j - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), 0.0)  # (T, T)
    advantages = (delta.double() @ discount.T).float() * mask  # A[:, t] = Σ_j (γλ)^{j-t} δ[:, j]
    return advantages, (advantages + values) * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """[detail: masked whitening] (x - mean) / std over the batch's real tokens only. shift_mean
    False keeps the mean (TRL's reward whitening). Padding stays 0."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)  # unbiased, as TRL
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def policy_loss(logp, old_logp, advantages, mask, cliprange, weights=None):
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7, https://arxiv.org/abs/1707.06347) per
    token, averaged over the real tokens: max(-A ρ, -A clip(ρ, 1-ε, 1+ε)), each token's term times
    the sampler correction's weight where given (common.sampler_weights, (N, T) or (N, 1)).
    Returns (loss, clipfrac, approxkl = ½ E[(log ρ)²])."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    losses = torch.max(-advantages * ratio, -advantages * clipped)
    clipfrac = masked_mean((-advantages * ratio < losses).float(), mask)
    if weights is not None:
        losses = losses * weights
    return masked_mean(losses, mask), clipfrac, 0.5 * masked_mean(log_ratio ** 2, mask)


def value_loss(values, old_values, returns, mask, cliprange_value):
    """[detail: value function loss clipping] ½ max((V - R)², (clip(V, V_old ± c) - R)²), averaged
    over real tokens. Returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(a, b), mask), masked_mean((b > a).float(), mask)


class AdaptiveKL:
    """Ziegler et al. 2019's controller (https://arxiv.org/abs/1909.08593, §2.2):
    β *= 1 + clip(KL / target - 1, ±0.2) x responses / horizon."""

    def __init__(self, kl_coef, target, horizon):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl, n):
        if self.target:
            self.value *= 1 + max(-0.2, min(0.2, kl / self.target - 1)) * n / self.horizon


# --------------------------------------------------------------------------------------------------
# One step: the rollout (scores, rewards, advantages) and the PPO epochs over it
def rollout(model, ref, tok, batch, rewards, kl_coef, args, rt, step, sample=common.generate_ids):
    """[algorithm] One response per prompt of batch (data.prompt_batch), sampled with the KV cache
    (or with `sample`, a vLLM engine); its score, the KL-penalised per-token rewards, GAE advantages
    and returns, and the sampler correction's weights. Returns the batch as a dict of tensors on
    the device (P: prompts, Y: responses) and the seconds spent sampling."""
    prompts, prompt_ids, answers, rows = (list(x) for x in zip(*batch))
    t0 = time.perf_counter()
    with common.unsharded(model):  # FSDP: whole weights on each rank while sampling: no collective
        ids, sampled_logp = sample(model.policy, tok, prompt_ids, rt, args.max_new_tokens,
                                   args.generation_batch_size, args.temperature, args.top_p,
                                   return_logprobs=True)
    texts = [tok.decode(r, skip_special_tokens=True) for r in ids]
    t_gen = time.perf_counter() - t0

    # [detail: left padding for generation] Prompts left-padded, responses right-padded (the mask
    # covers each response up to its EOS, inclusive), position ids from the mask.
    dev = rt.device
    P, P_mask = (t.to(dev) for t in common.pad(prompt_ids, tok.pad_token_id, side="left"))
    Y, Y_mask = (t.to(dev) for t in common.pad(ids, tok.pad_token_id))
    S = common.pad(sampled_logp, 0.0)[0].to(dev)  # the log-prob each token was drawn with
    mask = Y_mask.float()
    micro = [slice(i, i + args.micro_batch_size) for i in range(0, len(ids), args.micro_batch_size)]
    with torch.no_grad():
        columns, failed, extra = rewards(rows, prompts, texts, ids, answers, step, args.max_steps,
                                         rt)  # (N, K): one column per reward
        raw_scores = (columns @ rewards.weights).to(dev)
        # [detail: EOS trick] A response that never stopped (no end of turn or EOS: it hit
        # --max_new_tokens) gets a penalty.
        eos = torch.tensor([r[-1] in tok.stop_ids for r in ids], device=dev)
        scores = raw_scores - args.missing_eos_penalty * (~eos).float()
        parts = [model(P[mb], P_mask[mb], Y[mb], Y_mask[mb])[:2] for mb in micro]
        old_logp, old_values = (torch.cat(x) for x in zip(*parts))
        with models.adapter_off(ref):  # [detail: scale the logits by the sampling temperature]
            ref_logp = torch.cat([common.completion_logprobs(ref, P[mb], P_mask[mb], Y[mb],
                                                             Y_mask[mb], rt, args.temperature)[0]
                                  for mb in micro])
        token_rewards, kl = per_token_rewards(scores, old_logp, ref_logp, mask, kl_coef,
                                              args.kl_estimator)
        if args.whiten_rewards:
            token_rewards = masked_whiten(token_rewards, mask, shift_mean=False)
        advantages, returns = gae(token_rewards, old_values, mask, args.gamma, args.lam)
        # [detail: advantage whitening] Over the batch, within the response mask; under DDP, over
        # this rank's batch.
        advantages = masked_whiten(advantages, mask)
        # π_old is the trainer's own log-probs (above); the sampler's enter only as the weights
        weights = (common.sampler_weights(old_logp, S, mask, args.vllm_importance_sampling_mode,
                                          args.vllm_importance_sampling_clip_max,
                                          args.vllm_importance_sampling_clip_min)
                   if args.vllm_importance_sampling_correction else None)
        sampler = engine.sampler_metrics(old_logp, S, weights, mask, rt)
    return dict(P=P, P_mask=P_mask, Y=Y, Y_mask=Y_mask, mask=mask, old_logp=old_logp,
                weights=weights, sampler=sampler, old_values=old_values, advantages=advantages,
                returns=returns, scores=scores,
                raw_scores=raw_scores, eos=eos, kl=kl, failed=failed, extra=extra, prompts=prompts,
                texts=texts), t_gen


LOSSES = ("loss/policy", "loss/value", "policy/clipfrac", "val/clipfrac", "policy/approxkl")


def ppo_epochs(ddp, model, opt, b, args, rt, step):
    """[algorithm] --num_ppo_epochs passes over the rollout b, each shuffled into --num_mini_batches
    minibatches of one optimizer step each, on the clipped policy loss + vf_coef x the clipped value
    loss, a token mean over the minibatch (all ranks). Returns the LOSSES summed over the updates
    and the entropy summed over the first epoch's tokens (with their count)."""
    sums = dict.fromkeys(LOSSES, 0.0)
    sums["entropy"] = sums["entropy_tokens"] = 0.0
    mask, N = b["mask"], len(b["mask"])
    per_mini = N // args.num_mini_batches
    pg_weight = float(step >= args.value_warmup_steps)  # 0: the value model's warm-up
    for epoch in range(args.num_ppo_epochs):
        perm = torch.randperm(N, device=rt.device)
        for m in range(args.num_mini_batches):
            idx = perm[m * per_mini : (m + 1) * per_mini]
            parts = [idx[i : i + args.micro_batch_size]
                     for i in range(0, len(idx), args.micro_batch_size)]
            n_tok = common.all_reduce(mask[idx].sum(), rt).clamp(min=1)  # over all ranks
            for k, j in enumerate(parts):
                with common.no_sync(ddp, k < len(parts) - 1):
                    logp, values, ent = ddp(b["P"][j], b["P_mask"][j], b["Y"][j], b["Y_mask"][j],
                                            with_entropy=epoch == 0)
                    w = mask[j].sum() / n_tok * rt.world_size  # its share of the token mean
                    w_j = None if b["weights"] is None else b["weights"][j]
                    pg, pg_clip, approxkl = policy_loss(logp, b["old_logp"][j], b["advantages"][j],
                                                        mask[j], args.cliprange, w_j)
                    vf, vf_clip = value_loss(values, b["old_values"][j], b["returns"][j], mask[j],
                                             args.cliprange_value)
                    ((pg_weight * pg + args.vf_coef * vf) * w).backward()
                with torch.no_grad():
                    for name, v in zip(LOSSES, (pg, vf, pg_clip, vf_clip, approxkl)):
                        sums[name] += v * w / rt.world_size
                    if ent is not None:  # the first epoch sees every token once
                        sums["entropy"] += (ent * mask[j]).sum()
                        sums["entropy_tokens"] += mask[j].sum()
            common.clip_grad_norm(model, args.max_grad_norm)  # [detail: global gradient clipping]
            opt.step()
            runs.report_memory(model, opt, rt)  # once: what a rank holds
            opt.zero_grad(set_to_none=True)
    return sums


def step_metrics(sums, b, kl_coef, args, rt):
    """The step's metrics, with TRL's names: sums over this rank's responses, reduced over the
    ranks in one call."""
    mask, returns = b["mask"], b["returns"]
    with torch.no_grad():
        err = returns - b["old_values"]
        sums = {**sums, "scores": b["scores"].sum(), "raw_scores": b["raw_scores"].sum(),
                "kl": b["kl"].sum(), "eos": b["eos"].float().sum(), "tokens": mask.sum(),
                "responses": len(mask), "returns": (returns * mask).sum(),
                "returns_sq": (returns ** 2 * mask).sum(), "errors": (err * mask).sum(),
                "errors_sq": (err ** 2 * mask).sum(), "failed": b["failed"]}
        s = common.all_reduce_sums(sums, rt)
    updates, n, tokens = args.num_ppo_epochs * args.num_mini_batches, s["responses"], s["tokens"]
    var_returns = s["returns_sq"] / tokens - (s["returns"] / tokens) ** 2
    var_errors = s["errors_sq"] / tokens - (s["errors"] / tokens) ** 2  # Var(returns - values)
    row = {"objective/scores": s["scores"] / n, "objective/raw_scores": s["raw_scores"] / n,
           "objective/kl": s["kl"] / n, "objective/kl_per_token": s["kl"] / tokens,
           "objective/non_score_reward": -kl_coef * s["kl"] / n,
           "objective/rlhf_reward": (s["scores"] - kl_coef * s["kl"]) / n,
           "objective/entropy": s["entropy"] / max(s["entropy_tokens"], 1.0),
           **{k: s[k] / updates for k in LOSSES},
           "val/explained_variance": 1 - var_errors / max(var_returns, 1e-8),
           "eos_fraction": s["eos"] / n, "completions/mean_length": tokens / n, **b["sampler"]}
    if args.reward not in ("model", "verifiable"):  # a user's rule
        row["reward_errors"] = int(s["failed"])
    return row


# --------------------------------------------------------------------------------------------------
# Models and the reward
def token_values(value_model, prompt_ids, prompt_mask, response_ids, response_mask, rt):
    """(N, T) values V(s_t) of the states before each response token: the scalar head on the hidden
    state at the position that predicts token t (the prompt is left-padded, so position ids come
    from the mask)."""
    x = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    T = response_ids.shape[1]
    value_model = models.unwrap(value_model)  # LoRA (peft): its layers stay in the model unwrapped
    with rt.autocast():
        hidden = value_model.base_model(input_ids=x, attention_mask=mask,
                                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                        use_cache=False).last_hidden_state[:, -T - 1 : -1]
        head = value_model.score if hasattr(value_model, "score") else value_model.classifier
        return head(hidden).squeeze(-1).float()  # (N, T)


class PolicyAndValue(torch.nn.Module):
    """The two trained models in one module, so that DDP syncs both and one optimizer steps both
    (as TRL does)."""

    def __init__(self, policy, value, rt, temperature):
        super().__init__()
        self.policy, self.value, self.rt, self.temperature = policy, value, rt, temperature

    def forward(self, P, P_mask, Y, Y_mask, with_entropy=False):
        logp, entropy = common.completion_logprobs(self.policy, P, P_mask, Y, Y_mask, self.rt,
                                                   self.temperature, with_entropy)
        return logp, token_values(self.value, P, P_mask, Y, Y_mask, self.rt), entropy


def load_models(path, tok, args, rt):
    """The policy (trained), the reference (frozen), the reward model with its tokenizer (None
    without --reward model) and the value model (trained). [detail: disable dropout] in all of them
    (models.load_model); the frozen ones are in inference mode with no optimizer state. With LoRA
    (--lora_r) the reference is the policy with its adapter off (models.adapter_off)."""
    policy = models.load_trained(path, rt, args)
    ref = policy if args.lora_r else models.load_frozen(path, rt, args.trust_remote_code)
    rm, value_path = None, path
    if args.reward == "model":
        rm_path = value_path = models.resolve_model(args.reward_model, rt, "--reward_model")
        models.check_same_vocab(tok, rm_path, "--reward_model", args.trust_remote_code)
        rm = (models.load_reward_model(rm_path, rt, args.trust_remote_code),
              models.load_tokenizer(rm_path, args.trust_remote_code))
    if args.value_model:
        value_path = models.resolve_model(args.value_model, rt, "--value_model")
    # [detail: reward head initialisation] a new head: std 1/sqrt(d_model + 1)
    value = models.load_scalar_model(value_path, rt, args)
    value = models.add_lora(value, args, task_type="SEQ_CLS")  # SEQ_CLS: the head trains
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        value.gradient_checkpointing_enable()
    return policy, ref, rm, value


def reward_of(args, rule, rm):
    """The sequence score as tasks.Rewards computes it: the reward model's, grpo.py's verifiable
    accuracy + format_weight x format, or the user's rule."""
    if args.reward == "verifiable":
        funcs = [("accuracy", tasks.accuracy_reward, 1.0),
                 ("format", tasks.format_reward, args.format_weight)]
    else:
        funcs = [] if rule is None else [(args.reward, rule, 1.0)]
    return tasks.Rewards(funcs, args.grader, rm, 1.0, f"--reward_model {args.reward_model}",
                         args.reward_timeout)


def log_samples(run, step, b):
    """completions.jsonl: each response with its prompt, score, KL to the reference, and what the
    user's rule added with log_extra."""
    extra = {k: v for k, v in b["extra"].items() if len(v) == len(b["texts"])}
    kl = b["kl"].sum(1).tolist()
    run.samples.log(step, [{"prompt": p, "completion": t, "score": s, "kl": kl[i],
                            **{c: v[i] for c, v in extra.items()}}
                           for i, (p, t, s) in enumerate(zip(b["prompts"], b["texts"],
                                                             b["scores"].tolist()))])


# --------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args)
    rule = None
    if args.reward not in ("model", "verifiable"):
        rule = runs.load_function(args.reward, f"--reward {args.reward}: choose model (with "
                                   "--reward_model), verifiable or")
    rt = common.setup(args.seed, args.device, args.precision)
    if args.batch_size % (rt.world_size * args.num_mini_batches):
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of ranks x "
                        f"--num_mini_batches ({rt.world_size} x {args.num_mini_batches})")
    ckpt_path = runs.claim_output_dir(args, rt)

    # Prompts (a plain-string question gets tasks.BOX_INSTRUCTION appended: tasks.rl_prompt) and
    # the held-out (prompt, answer) pairs, graded greedily.
    path = models.resolve_model(args.model, rt)
    models.check_lengths(args, path, args.trust_remote_code)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    need = "--reward verifiable" if args.reward == "verifiable" else None
    sources, graded, order = data.load_prompts(args, tok, rt, need_answers=need)

    policy, ref, rm, value = load_models(path, tok, args, rt)
    rewards = reward_of(args, rule, rm)
    model = PolicyAndValue(policy, value, rt, args.temperature)
    ddp = common.distribute(model, args, rt)  # DDP or FSDP under torchrun; before the optimizer
    value_lr = args.value_learning_rate or args.learning_rate
    groups = [(policy.parameters(), args.learning_rate), (value.parameters(), value_lr)]
    opt, sched = runs.optimizer_and_schedule(model, args, groups)
    kl_ctl = AdaptiveKL(args.kl_coef, args.target_kl, args.kl_horizon)
    step = 0
    if args.resume:
        state = runs.restore_state(ckpt_path, model, opt, sched, args, rt)
        step, kl_ctl.value = state["step"], state["kl_coef"]
    # The sampler: common.generate_ids, or a vLLM engine (--use_vllm) with its interface, whose
    # weights are synced after every update
    sample = engine.VLLMSampler(path, tok, args, rt) if args.use_vllm else common.generate_ids
    if args.use_vllm and step:
        sample.sync(policy)  # resumed: the engine loaded the starting weights
    run = runs.Run(args, rt, step, ckpt_path, samples=True)

    @common.unsharded(model)  # FSDP: whole weights on each rank while evaluating: no collective
    def evaluate():
        if not graded:
            return {}
        prompts, answers = [p for p, _ in graded], [a for _, a in graded]
        out, texts = tasks.evaluate_answers(policy, tok, prompts, answers, rt, args.max_new_tokens,
                                            args.generation_batch_size, grader=args.grader)
        if rm is not None:  # the reward model's mean score of the same greedy held-out answers
            s = common.score_responses(*rm, prompts[rt.rank :: rt.world_size], texts, rt)
            out["eval/score"] = common.all_reduce(s.sum().to(rt.device), rt).item() / len(graded)
        return out

    if step == 0:
        run.first({"step": 0, **evaluate()})
    row = {}
    while step < run.last:
        t0 = time.perf_counter()
        # ---- [algorithm] 1. Rollout: one response per prompt; its score, the per-token rewards
        # with the KL penalty, GAE advantages (whitened) and returns
        batch = data.prompt_batch(sources, order, step * args.batch_size, args.batch_size, rt)
        b, t_gen = rollout(model, ref, tok, batch, rewards, kl_ctl.value, args, rt, step, sample)

        # ---- [algorithm] 2. PPO epochs over shuffled minibatches: clipped policy and value losses
        t1 = time.perf_counter()
        sums = ppo_epochs(ddp, model, opt, b, args, rt, step)
        if args.use_vllm:
            sample.sync(policy)  # the next rollout samples from the updated policy
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        t_train = time.perf_counter() - t1

        # ---- [plumbing] 3. Metrics, the KL controller, held-out evaluation, checkpoint
        row = {"step": step, **step_metrics(sums, b, kl_ctl.value, args, rt),
               "kl_coef": kl_ctl.value, "learning_rate": lr, "time/generate_s": t_gen,
               "time/score_s": t1 - t0 - t_gen, "time/train_s": t_train,
               "seconds_per_step": time.perf_counter() - t0}
        # what a user's rule logged with log_metric: this rank's means, as TRL logs them
        row.update({name: sum(v) / len(v) for name, v in rewards.logged.items()})
        rewards.logged.clear()
        kl_ctl.update(row["objective/kl"], args.batch_size)  # over all ranks
        if not math.isfinite(row["loss/policy"]) or not math.isfinite(row["loss/value"]):
            raise Diverged(f"the loss became {row['loss/policy']} (policy) / "
                           f"{row['loss/value']} (value) at step {step}")
        if graded and run.eval_due(step):
            row.update(evaluate())
        run.logged(row, score=row["objective/scores"], kl=row["objective/kl"], gen_s=t_gen,
                   train_s=t_train)
        if args.log_completions_every and step % args.log_completions_every == 0:
            log_samples(run, step, b)
        run.checkpoint(step, model, opt, sched, tok, saved=policy, kl_coef=kl_ctl.value)
    run.end(step, policy, tok, row, name="policy")


if __name__ == "__main__":
    runs.run(main)
