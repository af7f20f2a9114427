"""GRPO: group-relative policy optimisation with verifiable rewards (RLVR).

For each prompt x the policy samples a group of G completions y_1..y_G and each gets a reward r_i.
The advantage of a completion is its reward against its own group's (Shao et al. 2024, DeepSeekMath,
§4.1.2, https://arxiv.org/abs/2402.03300):

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + ε)

and every token of y_i is pushed by A_i through PPO's clipped ratio (Schulman et al. 2017, Eq. 7,
https://arxiv.org/abs/1707.06347), with a KL penalty to a frozen reference (DeepSeekMath Eq. 3, and
Eq. 4 for D_KL):

    J(θ) = 1/G Σ_i 1/|y_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε_high) A_i) - β D_KL,t ],
    ρ_it = π_θ(y_it | x, y_i<t) / π_old(y_it | x, y_i<t),
    D_KL,t = π_ref/π_θ - log(π_ref/π_θ) - 1     (the k3 estimator, ≥ 0, unbiased on samples of π_θ:
                                                  Schulman 2020,
                                                  http://joschu.net/blog/kl-approx.html)

The default reward is verifiable (RLVR: Lambert et al. 2024, Tülu 3,
https://arxiv.org/abs/2411.15124; accuracy and format rules as in DeepSeek-R1, Guo et al. 2025,
§2.2.2, https://arxiv.org/abs/2501.12948): r = 1[the last \\boxed{} equals the answer] + λ_fmt
1[there is a \\boxed{} answer], λ_fmt = 0.2 (our choice). Other rule functions (file.py:function,
written for TRL: they get the same keywords, the dataset's columns among them) and a reward model
trained by reward_model.py (--reward_model) can be added with weights; the rewards, the prompts and
the grader are the environment, in tasks.py.

With --tools each completion is a multi-turn episode (tools.py): the policy's turns, with the
results of the tools it called in between. The results' tokens stay in the completion, so the
policy's later tokens are computed in their context, but a second mask leaves them out of the
ratio, the loss, the KL, the entropy and every normaliser: y_i above is the policy's tokens only.

How this deviates from the equation as written, and from TRL:
1. --loss_type grpo (default) is DeepSeekMath's 1/|y_i| per-completion mean; `dapo` normalises by
   the tokens of the whole batch (Yu et al. 2025, §3.3, https://arxiv.org/abs/2503.14476; TRL's
   default), `dr_grpo` by a constant (completions x max_new_tokens); use it with --scale_rewards
   none (Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783, removes both the length and
   the std normalisation).
2. The std in A_i is the population std (divide by G). TRL's is Bessel-corrected (G - 1), so TRL's
   advantages are sqrt((G - 1) / G) times ours (0.94x at G = 8); ε = 1e-4.
3. The k3 term's gradient is, in expectation, that of KL(π_ref || π_θ), not KL(π_θ || π_ref), as in
   TRL, DeepSeekMath and verl; --kl_estimator k2 and --use_bias_correction_kl give the reverse KL's
   (kl_estimate). --advantage_estimator rloo and reinforce_pp(_baseline) replace A_i by RLOO's and
   REINFORCE++'s (advantages_of); --top_entropy_quantile trains only high-entropy tokens.
4. --importance_sampling_level sequence is GSPO (Zheng et al. 2025,
   https://arxiv.org/abs/2507.18071): one ratio per completion, s_i = (π_θ(y_i|x) /
   π_old(y_i|x))^(1/|y_i|), clipped per sequence, in place of ρ_it. With μ = 1 both ratios are 1 and
   the two give the same gradient.
5. β defaults to 0.05 (DeepSeekMath: 0.04; TRL: 0, and then no reference model is loaded, as here
   with --beta 0). With LoRA (--lora_r) the reference is the policy with its adapter switched off:
   one model in memory.
6. DAPO's dynamic sampling (Yu et al. 2025, §3.2) is on by default (TRL: off): a group whose rewards
   are all equal has zero advantages and teaches nothing, so it is replaced by a freshly sampled one
   (docs/grpo.md has the measured gain).
7. One step = one batch of --batch_size prompts x --num_generations completions, sampled once and
   then used for --num_iterations optimizer updates (μ in the GRPO paper) against the stored
   log-probs of the sampling policy.
8. Every log-prob (sampling policy, current policy, reference) is computed from logits /
   --temperature, the distribution that was actually sampled. With --top_p < 1 the log-probs are
   still those of the whole distribution, not of the truncated one that was sampled (as in TRL).
9. π_old is always the trainer's own log-probs of the sampled tokens; the sampler's (bf16
   incremental decoding here, a vLLM engine in TRL) enter only as a per-token importance weight
   min(π_old / π_sampler, C) on the policy term (common.sampler_weights: TRL's
   vllm_importance_sampling_correction, applied here to every sampler; 1 to rounding in fp32).

    python grpo.py --model out/sft                  # the built-in arithmetic task, after sft.py
    python grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k \\
        --dataset_config main --eval_split test --max_new_tokens 512
    torchrun --nproc_per_node=2 grpo.py ...         # DDP, same code path
    torchrun --nproc_per_node=2 grpo.py ... --fsdp  # FSDP2: weights, gradients, AdamW state sharded
"""
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

import common
import tasks
import tools
from plumbing import data, engine, models, runs
from plumbing.args import (Sampling, Shared, arg, at_least, between, check_args, default,
                           parse_args)
from plumbing.errors import Diverged, UserError


@dataclass
class Args(Sampling, Shared):
    # ---- GRPO ------------------------------------------------------------------------------------
    num_generations: int = arg(8, "completions per prompt: the group G")
    beta: float = arg(0.05, "weight of the k3 KL to the reference (β of DeepSeekMath Eq. 3); 0 "
                      "loads no reference model")
    epsilon: float = arg(0.2, "clip range below: the ratio is clipped at 1 - epsilon")
    epsilon_high: float = arg(0.2, "clip range above: at 1 + epsilon_high (DAPO's clip-higher uses "
                                   "0.28)")
    importance_sampling_level: str = arg("token", "token (GRPO: a ratio per token) or sequence "
                                         "(GSPO: one ratio per completion, the geometric mean of "
                                         "its tokens'; the GSPO paper clips it at --epsilon 3e-4 "
                                         "--epsilon_high 4e-4)")
    num_iterations: int = arg(1, "optimizer updates per sampled batch (μ); >1 reuses it with the "
                              "stored old log-probs")
    loss_type: str = arg("grpo", "grpo (DeepSeekMath: mean over each completion's tokens, then "
                         "over completions), dapo (over the batch's tokens), dr_grpo (sum / "
                         "(completions x max_new_tokens))")
    scale_rewards: str = arg("group", "divide advantages by the std of the group, of the whole "
                             "batch, or none (Dr. GRPO); with --advantage_estimator grpo only")
    advantage_estimator: str = arg("grpo", "grpo (r minus the group's mean, over the std of "
                                   "--scale_rewards), rloo (minus the mean of the group's other "
                                   "G-1: RLOO), reinforce_pp (the batch's mean and std: "
                                   "REINFORCE++; needs --no_dynamic_sampling), "
                                   "reinforce_pp_baseline (minus the group's mean, then whitened "
                                   "over the batch)")
    kl_estimator: str = arg("k3", "the KL term's per-token estimator, x = log π_θ/π_ref: k1 (x), "
                            "k2 (x²/2: its gradient is the reverse KL's), k3 (e^-x - 1 + x: "
                            "DeepSeekMath's)")
    use_bias_correction_kl: bool = arg(False, "weight the k3 term by π_θ/π_old (DeepSeek-V3.2): "
                                       "its gradient is then the reverse KL's, on- and "
                                       "off-policy")
    top_entropy_quantile: float = arg(1.0, "train the policy term only on the tokens whose "
                                      "entropy is in the top ρ of their micro-batch (Beyond the "
                                      "80/20 rule: 0.2); the rest stay in the normalisers and "
                                      "the KL term, as in TRL; 1: every token")
    dynamic_sampling: bool = arg(True, "DAPO's dynamic sampling: drop groups whose rewards are all "
                                 "equal (their advantages are 0) and sample fresh prompts in their "
                                 "place, up to --max_resample_rounds more rounds per step; a batch "
                                 "still short is filled up with dropped groups. "
                                 "--no_dynamic_sampling trains on every group")
    max_resample_rounds: int = arg(3, "with --dynamic_sampling: extra sampling rounds per step, at "
                                      "most")
    mask_truncated_completions: bool = arg(False, "leave completions that hit --max_new_tokens "
                                           "without stopping out of the loss")
    temperature: float = arg(1.0, "sampling temperature; every log-prob uses logits / temperature")
    top_p: float = arg(1.0, "nucleus sampling")
    reward_funcs: str = arg("accuracy,format", "comma-separated rule rewards: accuracy (1 if the "
                            "last \\boxed{} is right), format (1 if there is a \\boxed{}), or "
                            "path/to/file.py:function, called as TRL calls a reward function: "
                            "f(prompts=, completions=, completion_ids=, every dataset column, "
                            "**kwargs) -> a float (or None) per completion")
    reward_weights: str = arg("", "weights of --reward_funcs, comma-separated (default: 1 each, "
                              "0.2 for format: λ_fmt)")
    reward_model: Optional[str] = arg(None, "a reward_model.py output folder, added as one more "
                                            "reward")
    reward_model_weight: float = arg(1.0, "weight of --reward_model's score")
    reward_timeout: float = arg(120.0, "seconds a call of a path/to/file.py reward function may "
                                "take; one that runs longer is stopped and its completions score "
                                "0, counted as failures (0: no limit)")
    # ---- tools: multi-turn episodes (tools.py) ---------------------------------------------------
    tools: Optional[str] = arg(None, "tools the policy may call in an episode: calculator (built "
                               "in) or path/to/file.py:fn1,fn2 (functions with type hints and a "
                               "docstring, as TRL's tools); calls are written <tool_call>"
                               "{\"name\": ..., \"arguments\": {...}}</tool_call>")
    max_tool_calls: int = arg(4, "turns with tool calls an episode may have (TRL: "
                              "max_tool_calling_iterations); --max_new_tokens bounds the whole "
                              "episode, tool results included")
    tool_timeout: float = arg(10.0, "seconds a tool call may take; one that runs longer is "
                              "stopped and its error goes back to the model (0: no limit)")
    # ---- sampling and evaluation -----------------------------------------------------------------
    max_new_tokens: int = arg(96, "length limit of a completion (sampled and greedy)")
    max_prompt_length: int = arg(512, "prompts longer than this (tokens) are dropped and counted")
    generation_batch_size: int = arg(64, "completions sampled together in one generate call (KV "
                                         "cache)")
    grader: str = arg("exact", "how answers are graded: exact (numbers exactly) or math_verify "
                      "(also equal as mathematics, by the math-verify library: pip install "
                      "math-verify)")
    log_completions_every: int = arg(10, "write the sampled completions of every this many steps "
                                     "to <output_dir>/completions.jsonl (prompt, completion, each "
                                     "reward, advantage); 0: off")
    num_completions_to_print: int = arg(1, "of those, how many to print in the log")
    # ---- the shared arguments (plumbing/args.py) with this script's defaults ---------------------
    dataset: str = arg("arithmetic", "built-in task, local .jsonl/.json/.parquet/.csv, or Hub id; "
                       "comma-separated for a mixture. Rows need a `prompt` or `question` and, for "
                       "the accuracy reward, an `answer` (GSM8K's '#### 42' is understood) or a "
                       "`solution` with a \\boxed{}")
    eval_size: int = arg(64, "held-out prompts answered greedily to measure accuracy (pass@1); 0: "
                             "off")
    output_dir: str = default("out/grpo")
    batch_size: int = arg(8, "PROMPTS per step over all ranks; each gets --num_generations "
                          "completions, so a step trains on batch_size x num_generations "
                          "completions")
    micro_batch_size: int = arg(16, "completions per forward/backward pass; a multiple of "
                                "--num_generations lets each group's prompt go through the model "
                                "once")

    def __post_init__(self):
        if self.loss_type not in ("grpo", "dapo", "dr_grpo"):
            raise UserError(f"--loss_type {self.loss_type}: choose grpo, dapo or dr_grpo")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise UserError(f"--importance_sampling_level {self.importance_sampling_level}: choose "
                            "token or sequence")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise UserError(f"--scale_rewards {self.scale_rewards}: choose group, batch or none")
        if self.advantage_estimator not in ESTIMATORS:
            raise UserError(f"--advantage_estimator {self.advantage_estimator}: choose "
                            f"{', '.join(ESTIMATORS)}")
        if self.advantage_estimator != "grpo" and self.scale_rewards != "group":
            raise UserError(f"--scale_rewards applies to --advantage_estimator grpo only; "
                            f"{self.advantage_estimator} sets its own scale: drop --scale_rewards")
        if self.advantage_estimator == "reinforce_pp" and self.dynamic_sampling:
            raise UserError("--advantage_estimator reinforce_pp gives a group of equal rewards a "
                            "non-zero advantage (its baseline is the batch's mean), so dynamic "
                            "sampling would bias it: add --no_dynamic_sampling")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise UserError(f"--kl_estimator {self.kl_estimator}: choose k1, k2 or k3")
        if self.use_bias_correction_kl and self.kl_estimator != "k3":
            raise UserError("--use_bias_correction_kl corrects the k3 estimator: use it with "
                            "--kl_estimator k3")
        check_args(self, micro_batch_size=at_least(1), num_generations=at_least(2),
                   beta=at_least(0), epsilon=at_least(0), epsilon_high=at_least(0),
                   max_resample_rounds=at_least(0), reward_timeout=at_least(0),
                   max_tool_calls=at_least(1), tool_timeout=at_least(0),
                   top_entropy_quantile=between(0, 1))
        if not self.reward_funcs.strip(", ") and not self.reward_model:
            raise UserError("no reward: give --reward_funcs, --reward_model or both")


# --------------------------------------------------------------------------------------------------
# The algorithm: advantages, the groups to train on, the per-token objective and its aggregation.
# Pure functions of tensors.
def group_advantages(rewards, group_size, scale_rewards="group", eps=1e-4, batch_std=None):
    """DeepSeekMath §4.1.2 (https://arxiv.org/abs/2402.03300). rewards: (N,) with the G = group_size
    completions of each prompt contiguous -> (N,) advantages. group: (r - group mean) / (group std +
    eps), std over the group (population: TRL's is Bessel-corrected); batch: the group mean, but the
    std of the whole batch (batch_std when given, e.g. over DDP ranks); none:  r - group mean (Dr.
    GRPO). A group whose rewards are all equal gets zero advantages."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (r.std(1, unbiased=False, keepdim=True) + eps)
    elif scale_rewards == "batch":
        std = rewards.std(unbiased=False) if batch_std is None else batch_std
        centred = centred / (std + eps)
    return centred.view(-1)


ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def advantages_of(rewards, group_size, estimator="grpo", scale_rewards="group", reduce=None,
                  eps=1e-4):
    """--advantage_estimator: rewards (N,), the G = group_size completions of each prompt
    contiguous -> (N,) advantages. reduce sums a tensor over DDP ranks (None: this process), for
    the statistics of the whole batch.
    grpo:         group_advantages: r - the group's mean, over the std of --scale_rewards
    rloo:         r_i - the mean of the group's OTHER G - 1 rewards = G/(G-1) (r_i - group mean),
                  unscaled (Ahmadian et al. 2024, REINFORCE Leave-One-Out,
                  https://arxiv.org/abs/2402.14740; TRL's RLOOTrainer)
    reinforce_pp: (r - batch mean) / (batch std + eps), REINFORCE++'s global normalisation and no
                  group baseline (Hu 2025, https://arxiv.org/abs/2501.03262; OpenRLHF's
                  `reinforce++`, which puts the KL into the reward and whitens over tokens: here
                  the KL stays the loss's β term, so whitening over completions is the same up to
                  each completion's weight)
    reinforce_pp_baseline: r - the group's mean, then whitened over the batch (OpenRLHF's
                  `reinforce++_baseline`)
    All but reinforce_pp give a group whose rewards are all equal zero advantages, which dynamic
    sampling rests on."""
    if estimator == "grpo":
        batch_std = batch_moments(rewards, reduce)[1] if scale_rewards == "batch" else None
        return group_advantages(rewards, group_size, scale_rewards, eps, batch_std)
    r = rewards.view(-1, group_size)
    centred = (r - r.mean(1, keepdim=True)).view(-1)
    if estimator == "rloo":
        return centred * group_size / (group_size - 1)
    x = rewards if estimator == "reinforce_pp" else centred
    mean, std = batch_moments(x, reduce)
    return (x - mean) / (std + eps)


def batch_moments(x, reduce=None):
    """The mean and the (population) std of x (N,) over the whole batch: every rank's, summed by
    reduce."""
    s = torch.stack([x.sum(), (x**2).sum(), torch.tensor(float(len(x)), dtype=x.dtype)])
    s = s if reduce is None else reduce(s).to(x)
    mean = s[0] / s[2]
    return mean, (s[1] / s[2] - mean**2).clamp(min=0).sqrt()


def zero_std(rewards):
    """(M, G) rewards of M groups -> (M,) bools: the groups whose G rewards are all equal."""
    return rewards.std(1) < 1e-6


def dynamic_sampling(rewards, n_groups):
    """DAPO's dynamic sampling (Yu et al. 2025, §3.2, https://arxiv.org/abs/2503.14476): which of
    the M groups sampled this step to train on. rewards: (M, G), M >= n_groups, in sampling order ->
    n_groups indices. It rests on group_advantages giving a group whose rewards are all equal zero
    advantages (r - mean = 0, for every --scale_rewards): such a group adds nothing to the
    policy-gradient term, only to the KL term, and takes a place in the batch. So the first n_groups
    groups whose rewards differ are kept; if there are fewer, the batch is filled up with
    equal-reward groups, in sampling order."""
    flat = zero_std(rewards).tolist()
    varied = [i for i, f in enumerate(flat) if not f]
    return (varied + [i for i, f in enumerate(flat) if f])[:n_groups]


def kl_estimate(logp, ref_logp, estimator="k3"):
    """--kl_estimator: (N, T) log-probs of the sampled tokens under π_θ and π_ref -> (N, T)
    per-token estimates of KL(π_θ || π_ref) (Schulman 2020, "Approximating KL divergence",
    http://joschu.net/blog/kl-approx.html). With x = log π_θ/π_ref at a token sampled from π_θ, all
    three estimate the KL's value (k1 and k3 without bias), but as loss terms they pull
    differently; their gradients, in expectation over the samples:
    k1 = x             ∇x = ∇ log π_θ, whose expectation is 0: no pull towards π_ref at all
    k2 = x²/2          x ∇ log π_θ: ∇ KL(π_θ || π_ref), the reverse KL's own gradient
    k3 = e^-x - 1 + x  (1 - π_ref/π_θ) ∇ log π_θ: ∇ KL(π_ref || π_θ), the forward KL's
                       (DeepSeekMath Eq. 4, https://arxiv.org/abs/2402.03300)"""
    x = logp - ref_logp
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x**2
    return torch.exp(-x) - 1 + x


def high_entropy_mask(entropy, mask, quantile):
    """--top_entropy_quantile ρ (Wang et al. 2025, "Beyond the 80/20 rule",
    https://arxiv.org/abs/2506.01939; TRL's get_high_entropy_mask): entropy, mask (N, T) -> (N, T)
    float, 1 at the tokens of mask whose entropy is at least the (1 - ρ)-quantile of the entropies
    of mask's tokens, 0 elsewhere."""
    values = entropy[mask.bool()].float()
    if values.numel() == 0:
        return torch.zeros_like(mask)
    return ((entropy >= torch.quantile(values, 1 - quantile)) & mask.bool()).to(mask.dtype)


def per_token_loss(logp, old_logp, ref_logp, advantages, epsilon, epsilon_high, beta, mask=None,
                   level="token", weights=None, kl_estimator="k3", bias_correction=False):
    """DeepSeekMath Eq. 3's objective, negated, per token. logp, old_logp, ref_logp: (N, T)
    log-probs of the sampled tokens under π_θ, π_old, π_ref (ref_logp None when beta is 0);
    advantages: (N,). Returns (N, T) loss, (N, T) k3 KL (zeros without a reference), and the (N, T)
    booleans where the clip engaged below and above. level "sequence" is GSPO: every token of y_i
    carries the one ratio s_i of its sequence (mask: (N, T), its tokens). weights, (N, T) or
    (N, 1), on the clipped term only, as in TRL: the sampler correction (common.sampler_weights),
    times the entropy mask. The KL term is kl_estimate's; bias_correction weights it by the token's
    ratio π_θ/π_old, gradient included (DeepSeek-V3.2, https://arxiv.org/abs/2512.02556, the
    unbiased KL estimate): on samples of π_old, (π_θ/π_old) k3 has the gradient of KL(π_θ ||
    π_ref), what k2 has on-policy only."""
    log_ratio = logp - old_logp
    if level == "sequence":
        # GSPO (Zheng et al. 2025, Eq. 7, https://arxiv.org/abs/2507.18071): s_i = (π_θ(y_i|x) /
        # π_old(y_i|x))^(1/|y_i|), the exp of the mean token log-ratio, clipped per sequence (Eq.
        # 5).
        mean = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        log_ratio = mean.expand_as(logp)
    ratio = torch.exp(log_ratio)  # ρ_it, or s_i at every token of y_i
    A = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    # the clipped surrogate: no incentive to move ρ past the clip
    loss = -torch.min(ratio * A, clipped * A)
    if weights is not None:
        loss = loss * weights
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_estimator)  # k3: π_ref/π_θ - log(π_ref/π_θ) - 1
        if bias_correction:
            kl = kl * torch.exp(logp - old_logp)
        loss = loss + beta * kl
    else:
        kl = torch.zeros_like(logp)
    # Where the min picked the clipped term, the token gives no gradient: below for A < 0, above for
    # A > 0.
    low, high = (ratio < 1 - epsilon) & (A < 0), (ratio > 1 + epsilon_high) & (A > 0)
    return loss, kl, low, high


def aggregate(loss, mask, loss_type, num_completions, num_tokens, max_new_tokens):
    """This micro-batch's share of the batch loss. loss, mask: (n, T). The normalisers are over the
    WHOLE batch (all micro-batches and ranks), so the gradient does not depend on how the batch is
    split:
    grpo:    1/N Σ_i 1/|y_i| Σ_t loss_it        (DeepSeekMath Eq. 3: per completion, then over them)
    dapo:    Σ_it loss_it / Σ_i |y_i|            (each token weighs the same: long ones not diluted)
    dr_grpo: Σ_it loss_it / (N · max_new_tokens) (a constant: no length bias at all)"""
    loss = loss * mask
    if loss_type == "grpo":
        return (loss.sum(1) / mask.sum(1).clamp(min=1)).sum() / num_completions
    if loss_type == "dapo":
        return loss.sum() / num_tokens
    if loss_type == "dr_grpo":
        return loss.sum() / (num_completions * max_new_tokens)
    raise ValueError(loss_type)


# --------------------------------------------------------------------------------------------------
# The rollout, the batch as tensors, and the update on it
def rollout(model, tok, batch, rewards, args, rt, step, sample=common.generate_ids,
            toolbox=None):
    """Sample G completions for each prompt of batch ([(messages, ids, answer, row)],
    data.prompt_batch) with the KV cache (or with `sample`, a vLLM engine), or with `toolbox`
    (tools.Tools) G multi-turn episodes (tools.episodes), and score them. Returns the groups, one
    dict per prompt: "prompt_ids", "completion_ids", "policy" (G lists each: 1 for a token the
    policy sampled, 0 for one of a tool's result), "sampled_logp" (the log-prob each token was
    drawn with), "per_func" (G, K) the rewards of each function, "rewards" (G,) their weighted sum,
    "episodes" (with tools: their messages and call counts), and for completions.jsonl "prompt",
    "texts", "extra"; then the number of reward-function failures and the seconds spent
    scoring."""
    G = args.num_generations  # each prompt repeated G times: rows g*G .. g*G+G-1 are one group
    prompts = [messages for messages, _, _, _ in batch for _ in range(G)]
    prompt_ids = [ids for _, ids, _, _ in batch for _ in range(G)]
    answers = [answer for _, _, answer, _ in batch for _ in range(G)]
    rows = [row for _, _, _, row in batch for _ in range(G)]
    with common.unsharded(model):  # FSDP: whole weights on each rank while sampling: no collective
        if toolbox is None:
            completion_ids, sampled_logp = sample(
                model, tok, prompt_ids, rt, args.max_new_tokens, args.generation_batch_size,
                args.temperature, args.top_p, return_logprobs=True)
            policy = [[1] * len(c) for c in completion_ids]
            texts = [tok.decode(c, skip_special_tokens=True) for c in completion_ids]
            episodes = messages = None
        else:  # the tool results' tokens are in completion_ids, marked 0 in policy
            episodes = tools.episodes(sample, model, tok, prompt_ids, toolbox,
                                      toolbox.template_kwargs(tok), rt, args.max_new_tokens,
                                      args.generation_batch_size, args.temperature, args.top_p,
                                      args.max_tool_calls)
            completion_ids, sampled_logp, policy, texts, messages = (
                [e[k] for e in episodes] for k in ("ids", "logps", "policy", "text", "messages"))
    t = time.perf_counter()
    # the built-in rewards read what the policy wrote (texts); a user's function gets an episode's
    # assistant and tool messages, as TRL passes them
    per_func, failed, extra = rewards(rows, prompts, texts, completion_ids, answers, step,
                                      args.max_steps, rt, messages)
    groups = []
    for g in range(0, len(prompts), G):
        part = slice(g, g + G)
        groups.append({"prompt_ids": prompt_ids[part], "completion_ids": completion_ids[part],
                       "policy": policy[part], "sampled_logp": sampled_logp[part],
                       "per_func": per_func[part], "rewards": per_func[part] @ rewards.weights,
                       "prompt": prompts[g], "texts": texts[part],
                       "episodes": episodes and episodes[part],
                       "extra": {k: v[part] for k, v in extra.items()}})
    return groups, failed, time.perf_counter() - t


def as_tensors(groups, tok, args, dev):
    """The groups' sequences in the layout of generation: prompts left-padded (N, P), completions
    right-padded (N, T) with their attention mask Y_mask up to each stop token inclusive; the
    (N, T) loss mask: the policy's own tokens (not a tool result's, nor padding; without the
    truncated completions under --mask_truncated_completions), which every loss, KL, entropy and
    length normaliser counts; and the (N, T) log-probs the sampler drew each token with."""
    prompt_ids = [x for g in groups for x in g["prompt_ids"]]
    completion_ids = [x for g in groups for x in g["completion_ids"]]
    P, P_mask = common.pad(prompt_ids, tok.pad_token_id, side="left")
    Y, Y_mask = common.pad(completion_ids, tok.pad_token_id)
    mask = common.pad([x for g in groups for x in g["policy"]], 0)[0] * Y_mask
    # hit max_new_tokens
    truncated = torch.tensor([c[-1] not in tok.stop_ids for c in completion_ids])
    lengths = mask.sum(1)  # the policy's tokens
    if args.mask_truncated_completions:
        mask = mask * (~truncated)[:, None]
    S = common.pad([x for g in groups for x in g["sampled_logp"]], 0.0)[0]
    P, P_mask, Y, Y_mask, mask, S = (t.to(dev) for t in (P, P_mask, Y, Y_mask, mask, S))
    return {"P": P, "P_mask": P_mask, "Y": Y, "Y_mask": Y_mask, "mask": mask.float(), "S": S,
            "truncated": truncated, "lengths": lengths}


def load_models(path, args, rt):
    """The policy (trained); the frozen reference, only if beta > 0 (with LoRA the policy itself,
    its adapter switched off by models.adapter_off); and the reward model, if any, with its
    tokenizer."""
    model = models.load_trained(path, rt, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ref = None
    if args.beta > 0:
        ref = model if args.lora_r else models.load_frozen(path, rt, args.trust_remote_code)
    rm = None
    if args.reward_model:
        rm_path = models.resolve_model(args.reward_model, rt, "--reward_model")
        rm = (models.load_reward_model(rm_path, rt, args.trust_remote_code),
              models.load_tokenizer(rm_path, args.trust_remote_code))
    return model, ref, rm


def policy_updates(ddp, model, ref, opt, b, advantages, args, rt):
    """The update on one sampled batch (b: as_tensors): the log-probs of the sampling policy (needed
    only when μ > 1) and of the reference, then μ = --num_iterations optimizer steps, each over
    every micro-batch, on DeepSeekMath Eq. 3's objective. Returns the metric sums: loss and clip
    counts over every update (averaged over the μ updates, as TRL logs them), the rest on the first
    pass, where the policy is still the one that sampled; the sampler correction's metrics
    (common.sampler_metrics); the gradient norms."""
    G, N = args.num_generations, len(advantages)
    micro = [slice(i, i + args.micro_batch_size) for i in range(0, N, args.micro_batch_size)]
    num_completions = common.all_reduce(float(N), rt).item()
    num_tokens = max(common.all_reduce(b["mask"].sum(), rt).item(), 1.0)
    share = G if args.micro_batch_size % G == 0 else 1  # whole groups: each prompt computed once

    def logps(m, mb, entropy=False):
        return common.completion_logprobs(m, b["P"][mb], b["P_mask"][mb], b["Y"][mb],
                                          b["Y_mask"][mb], rt, args.temperature, entropy, share)

    with torch.no_grad():
        old_logp = ref_logp = None
        if args.num_iterations > 1:
            old_logp = torch.cat([logps(model, mb)[0] for mb in micro])
        if ref is not None:
            with models.adapter_off(ref):
                ref_logp = torch.cat([logps(ref, mb)[0] for mb in micro])
    names = ("loss", "clip_low", "clip_high", "kl", "entropy", "tokens")
    sums = {k: torch.zeros((), device=rt.device) for k in names}
    olds, weights, grad_norms = [], [], []  # π_old and the weights of the first pass
    for it in range(args.num_iterations):
        for k, mb in enumerate(micro):
            with common.no_sync(ddp, k < len(micro) - 1):
                logp, ent = logps(ddp, mb, entropy=it == 0 or args.top_entropy_quantile < 1)
                # With μ = 1 the sampling policy is the current one: π_old = π_θ detached, ratio 1.
                # π_old is always the trainer's own log-probs; what the sampler computed (S) enters
                # only through the importance weights.
                old = old_logp[mb] if old_logp is not None else logp.detach()
                m = b["mask"][mb]  # the policy's tokens
                w = (common.sampler_weights(old, b["S"][mb], m, args.vllm_importance_sampling_mode,
                                            args.vllm_importance_sampling_clip_max,
                                            args.vllm_importance_sampling_clip_min)
                     if args.vllm_importance_sampling_correction else None)
                pw = w  # the policy term's weights: with the entropy mask, its high-entropy tokens
                if args.top_entropy_quantile < 1:
                    keep = high_entropy_mask(ent, m, args.top_entropy_quantile)
                    pw = keep if w is None else w * keep
                ref_mb = None if ref_logp is None else ref_logp[mb]
                loss, kl, low, high = per_token_loss(
                    logp, old, ref_mb, advantages[mb], args.epsilon, args.epsilon_high, args.beta,
                    m, args.importance_sampling_level, pw, args.kl_estimator,
                    args.use_bias_correction_kl)
                part = aggregate(loss, m, args.loss_type, num_completions, num_tokens,
                                 args.max_new_tokens)
                (part * rt.world_size).backward()  # DDP averages over ranks; normalisers are global
            sums["loss"] += part.detach() / args.num_iterations
            sums["clip_low"] += (low * m).sum() / args.num_iterations
            sums["clip_high"] += (high * m).sum() / args.num_iterations
            if it == 0:
                olds.append(old)
                weights.append(w)
                sums["kl"] += (kl * m).sum().detach()
                sums["entropy"] += (ent * m).sum()
                sums["tokens"] += m.sum()
        grad_norms.append(common.clip_grad_norm(model, args.max_grad_norm))
        opt.step()
        runs.report_memory(model, opt, rt)  # once: what a rank holds
        opt.zero_grad(set_to_none=True)
    # The sampler and the training forward compute the same distribution (same weights), but
    # incrementally with the KV cache (or in vLLM): the gap is rounding, logged with the weights.
    w = None if weights[0] is None else torch.cat(weights)
    sampler = engine.sampler_metrics(torch.cat(olds), b["S"], w, b["mask"], rt)
    return sums, sampler, grad_norms


# --------------------------------------------------------------------------------------------------
# Metrics
def step_metrics(sums, sampler, sampled, groups, b, failed, rewards, rt, G):
    """One step's metrics, reduced over ranks, named as TRL names them. sums: the token sums of the
    updates; sampler: the sampler correction's metrics; the reward metrics are over every group
    sampled this step (with --dynamic_sampling the dropped ones too)."""
    sums = common.all_reduce_sums(sums, rt)
    all_rewards = torch.stack([g["rewards"] for g in sampled])  # (groups, G)
    group_std = all_rewards.std(1, unbiased=False)
    per_func = torch.cat([g["per_func"] for g in sampled]).sum(0)
    counts = {"reward": all_rewards.sum(), "reward_std": group_std.sum(),
              "zero_std": (group_std < 1e-6).sum(), "length": b["lengths"].sum(),
              "truncated": b["truncated"].sum(), "failed": failed, "groups": len(sampled),
              "completions": len(b["lengths"]),
              "trained_zero_std": zero_std(torch.stack([g["rewards"] for g in groups])).sum(),
              **{f"rewards/{n}": v for n, v in zip(rewards.names, per_func)}}
    counts = common.all_reduce_sums(counts, rt)
    n_groups, n, tokens = counts["groups"], counts["completions"], max(sums["tokens"], 1.0)
    return {"loss": sums["loss"], "reward": counts["reward"] / (n_groups * G),
            "reward_std": counts["reward_std"] / n_groups,
            "frac_reward_zero_std": counts["zero_std"] / n_groups,
            **{f"rewards/{k}/mean": counts[f"rewards/{k}"] / (n_groups * G) for k in rewards.names},
            "reward_errors": int(counts["failed"]), "kl": sums["kl"] / tokens,
            "entropy": sums["entropy"] / tokens, "clip_ratio/low_mean": sums["clip_low"] / tokens,
            "clip_ratio/high_mean": sums["clip_high"] / tokens, **sampler,
            "completions/mean_length": counts["length"] / n,
            "completions/clipped_ratio": counts["truncated"] / n,
            "dynamic_sampling/frac_trained_zero_std": counts["trained_zero_std"] / (n / G)}


def log_samples(run, step, groups, advantages, names):
    """The step's completions, each with its rewards and advantage, to completions.jsonl (with
    tools, an episode's completion is its messages: each assistant turn, tool call and result)."""
    adv, records = iter(advantages.tolist()), []
    for g in groups:
        for j, (text, r, f) in enumerate(zip(g["texts"], g["rewards"], g["per_func"])):
            if g["episodes"]:
                text = g["episodes"][j]["messages"]
            records.append({"prompt": g["prompt"], "completion": text, "reward": r.item(),
                            "rewards": dict(zip(names, f.tolist())), "advantage": next(adv),
                            **{k: v[j] for k, v in g["extra"].items()}})
    run.samples.log(step, records)


# --------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args)
    rt = common.setup(args.seed, args.device, args.precision)
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch_size {args.batch_size} (prompts) must be a multiple of the "
                        f"{rt.world_size} ranks")
    funcs = tasks.reward_functions(args.reward_funcs, args.reward_weights)
    ckpt_path = runs.claim_output_dir(args, rt)

    # Prompts and answers (a plain-string question gets tasks.BOX_INSTRUCTION appended:
    # tasks.rl_prompt); the held-out (prompt, answer) pairs are graded greedily (pass@1).
    path = models.resolve_model(args.model, rt)
    models.check_lengths(args, path, args.trust_remote_code)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    need = "the accuracy reward" if any(f is tasks.accuracy_reward for _, f, _ in funcs) else None
    reads = 1 + args.max_resample_rounds * args.dynamic_sampling  # prompt batches a step may read
    # the tools an episode may call (tools.py), described in every prompt
    toolbox = tools.Tools(args.tools, args.tool_timeout) if args.tools else None
    sources, graded, order = data.load_prompts(args, tok, rt, need, reads, toolbox)

    model, ref, rm = load_models(path, args, rt)
    rm_name = f"--reward_model {args.reward_model}"
    rewards = tasks.Rewards(funcs, args.grader, rm, args.reward_model_weight, rm_name,
                            args.reward_timeout)
    ddp = common.distribute(model, args, rt)  # DDP or FSDP under torchrun; before the optimizer
    opt, sched = runs.optimizer_and_schedule(model, args)
    # cursor: how far the prompt stream has been read (with dynamic sampling > step x batch)
    step, cursor = 0, 0
    if args.resume:  # these change the loss or the prompt stream: they must match the checkpoint's
        same = ("loss_type", "beta", "dynamic_sampling", "max_resample_rounds",
                "importance_sampling_level")
        state = runs.restore_state(ckpt_path, model, opt, sched, args, rt, must_match=same)
        step, cursor = state["step"], state.get("cursor", state["step"] * args.batch_size)
    # The sampler: common.generate_ids, or a vLLM engine (--use_vllm) with its interface, whose
    # weights are synced after every update
    sample = engine.VLLMSampler(path, tok, args, rt) if args.use_vllm else common.generate_ids
    if args.use_vllm and step:
        sample.sync(model)  # resumed: the engine loaded the starting weights
    run = runs.Run(args, rt, step, ckpt_path, samples=True)

    @common.unsharded(model)  # FSDP: whole weights on each rank while evaluating: no collective
    def evaluate():
        if not graded:
            return {}
        prompts, answers = [p for p, _ in graded], [a for _, a in graded]
        return tasks.evaluate_answers(model, tok, prompts, answers, rt, args.max_new_tokens,
                                      args.generation_batch_size, args.grader, toolbox,
                                      args.max_tool_calls)[0]

    if step == 0:
        run.first({"step": 0, **evaluate()})
    G, row = args.num_generations, {}
    while step < run.last:
        t0 = time.perf_counter()
        # ---- [algorithm] 1. Rollout: G completions per prompt, sampled with the KV cache; rewards
        batch = data.prompt_batch(sources, order, cursor, args.batch_size, rt)
        groups, failed, t_score = rollout(model, tok, batch, rewards, args, rt, step, sample,
                                          toolbox)
        sampled, cursor, rounds = groups, cursor + args.batch_size, 0
        # ---- [algorithm] 2. Dynamic sampling (DAPO §3.2): sample more while any rank is short of
        # groups whose rewards differ, then keep those first
        while args.dynamic_sampling and rounds < args.max_resample_rounds:
            short = (~zero_std(torch.stack([g["rewards"] for g in sampled]))).sum() < len(groups)
            if not common.all_reduce(float(short), rt, op="max").item():  # all ranks take part
                break
            batch = data.prompt_batch(sources, order, cursor, args.batch_size, rt)
            more, f, t = rollout(model, tok, batch, rewards, args, rt, step, sample, toolbox)
            sampled, failed, t_score = sampled + more, failed + f, t_score + t
            cursor, rounds = cursor + args.batch_size, rounds + 1
        if args.dynamic_sampling:
            keep = dynamic_sampling(torch.stack([g["rewards"] for g in sampled]), len(groups))
            groups = [sampled[i] for i in keep]
        t_gen = time.perf_counter() - t0 - t_score

        # ---- [algorithm] 3. Advantages within each group (DeepSeekMath §4.1.2), or RLOO's,
        # REINFORCE++'s (batch statistics over every rank)
        r = torch.cat([g["rewards"] for g in groups])
        advantages = advantages_of(r, G, args.advantage_estimator, args.scale_rewards,
                                   lambda t: common.all_reduce(t, rt)).to(rt.device)

        # ---- [algorithm] 4. Update: μ optimizer steps on the clipped objective with its KL term
        b = as_tensors(groups, tok, args, rt.device)
        t1 = time.perf_counter()
        sums, sampler, grad_norms = policy_updates(ddp, model, ref, opt, b, advantages, args, rt)
        if args.use_vllm:
            sample.sync(model)  # the next rollout samples from the updated policy
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        t_train = time.perf_counter() - t1

        # ---- [plumbing] 5. Metrics, held-out evaluation, completions.jsonl, checkpoint
        metrics = step_metrics(sums, sampler, sampled, groups, b, failed, rewards, rt, G)
        row = {"step": step, **metrics,
               "grad_norm": sum(grad_norms) / len(grad_norms), "learning_rate": lr,
               "time/generate_s": t_gen, "time/score_s": t_score, "time/train_s": t_train,
               "seconds_per_step": time.perf_counter() - t0}
        # what users' functions logged with log_metric: this rank's means, as TRL logs them
        row.update({name: sum(v) / len(v) for name, v in rewards.logged.items()})
        rewards.logged.clear()
        if toolbox is not None:  # over every episode sampled this step
            row.update(tools.metrics([e for g in sampled for e in g["episodes"]], rt))
        if args.dynamic_sampling:
            row["dynamic_sampling/rounds"] = rounds
        else:
            del row["dynamic_sampling/frac_trained_zero_std"]
        if not all(math.isfinite(row[k]) for k in ("loss", "grad_norm")):
            raise Diverged(f"the loss or its gradient became {row['loss']} / {row['grad_norm']} at "
                           f"step {step}")
        if graded and run.eval_due(step):
            row.update(evaluate())
        run.logged(row, reward=row["reward"], kl=row["kl"], len=row["completions/mean_length"])
        if args.log_completions_every and step % args.log_completions_every == 0:
            log_samples(run, step, groups, advantages, rewards.names)
        run.checkpoint(step, model, opt, sched, tok, cursor=cursor)
    run.end(step, model, tok, row)


if __name__ == "__main__":
    runs.run(main)
