"""RLHF with PPO: a policy, a frozen reference, a reward model and a value model; GAE; a KL penalty in the reward.

The objective is the KL-regularised reward of RLHF (Ziegler et al. 2019, arXiv:1909.08593, Eq. 2; Ouyang et al.
2022, InstructGPT, arXiv:2203.02155, Eq. 2): maximise the reward of sampled responses while staying close to the
reference policy,

    max_θ E_{x, y ~ π_θ}[ r_φ(x, y) ] - β KL[ π_θ(·|x) || π_ref(·|x) ],

optimised with PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, Eq. 7) on per-token advantages
from a learned value function. Each response token is an action; the per-token reward is the KL penalty -β (log π_old - log π_ref)
(the k1 estimate) at every token, plus the reward model's score at the last token. Advantages come from GAE
(Schulman et al. 2016, arXiv:1506.02438, Eq. 16; γ = 1, λ = 0.95) and are whitened over the batch. The implementation details that make PPO work for language
models (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031) are each named in
a comment where they happen, tagged [detail: its name].

The reward is a model trained by reward_model.py (--reward_model) or the verifiable math reward of grpo.py
(--reward verifiable: 1[correct \\boxed{} answer] + 0.2 x 1[a \\boxed{} answer]). The value model starts as the reward model (its head predicts the final score) or, with the
verifiable reward, as the policy with a new scalar head. With LoRA (--lora_r) the reference is the policy with its
adapter switched off (one model in memory, not two), and the value model trains an adapter and its whole head.

How this deviates from TRL's PPOTrainer: the KL and entropy are logged per token, and `objective/entropy` is the
entropy of the policy's distribution (TRL logs the NLL of the sampled tokens under that name).

    python ppo.py --model out/sft --reward_model out/reward_model   # after sft.py and reward_model.py
    python ppo.py --model out/sft --reward verifiable                # the built-in task's exact reward
    torchrun --nproc_per_node=2 ppo.py ...                           # DDP, same code path
    torchrun --nproc_per_node=2 ppo.py ... --fsdp                    # FSDP2: weights, gradients, AdamW state sharded
"""
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

import common
import tasks
from plumbing import data, models, runs
from plumbing.args import arg, at_least, between, check_args, parse_args, POSITIVE
from plumbing.errors import Diverged, UserError


@dataclass
class Args:
    model: str = arg(models.DEFAULT_MODEL, "the policy to train: Hub id, local folder (e.g. sft.py's output) or .gguf")
    reward: str = arg("model", "model (score responses with --reward_model), verifiable ("
                      "1[correct \\boxed{} answer] + --format_weight x 1[a \\boxed{} answer]), or a rule "
                      "path/to/file.py:function, called as TRL calls a reward function (prompts=, completions=, "
                      "completion_ids=, every dataset column, **kwargs)")
    reward_model: Optional[str] = arg(None, "a reward_model.py output folder (same tokenizer as the policy)")
    value_model: Optional[str] = arg(None, "initial value model: default the reward model, or with --reward "
                                     "verifiable the policy with a new scalar head")
    format_weight: float = arg(0.2, "λ_fmt of the verifiable reward")
    dataset: str = arg("arithmetic", "prompts: built-in task name, local .jsonl/.json/.parquet/.csv, or Hub id; "
                       "comma-separated for a mixture. Rows need a `prompt` or `question`; an `answer` for accuracy")
    dataset_weights: str = arg("", "sampling weights of a mixture, comma-separated (default: equal)")
    dataset_split: str = arg("train", "split of Hub datasets to train on")
    dataset_config: Optional[str] = arg(None, "config (subset) name of Hub datasets")
    eval_split: Optional[str] = arg(None, "held-out split of the first dataset; default: hold out --eval_size rows")
    eval_size: int = arg(64, "held-out prompts answered greedily to measure accuracy with the verifiable grader; 0: off")
    grader: str = arg("exact", "how answers are graded: exact (numbers exactly) or math_verify (also equal as "
                      "mathematics, by the math-verify library: pip install math-verify)")
    eval_every: int = arg(5, "measure held-out accuracy every this many steps (and at start and end; 0: only those)")
    output_dir: str = arg("out/ppo", "where the final policy, args.json, metrics.jsonl and checkpoint.pt go")
    overwrite_output_dir: bool = arg(False, "replace the run an --output_dir already holds (without it: refused)")
    max_steps: int = arg(20, "steps; each samples one batch and runs --num_ppo_epochs epochs on it")
    batch_size: int = arg(16, "prompts per step over all ranks, one response each")
    num_mini_batches: int = arg(1, "optimizer updates per PPO epoch: the batch is shuffled and split into this many")
    micro_batch_size: int = arg(16, "responses per forward/backward pass")
    generation_batch_size: int = arg(64, "responses sampled together in one generate call (KV cache)")
    num_ppo_epochs: int = arg(2, "passes over each sampled batch (TRL: 4)")
    max_new_tokens: int = arg(96, "length limit of a response")
    max_prompt_length: int = arg(512, "prompts with more tokens than this are dropped (and counted)")
    temperature: float = arg(0.7, "sampling temperature (TRL's default); every log-prob uses logits / temperature")
    top_p: float = arg(1.0, "nucleus sampling")
    missing_eos_penalty: float = arg(1.0, "subtracted from the score of a response that never emitted EOS")
    kl_coef: float = arg(0.05, "β of the per-token KL penalty (initial value with --target_kl)")
    target_kl: Optional[float] = arg(None, "turn on the adaptive KL controller (Ziegler et al. 2019) with this "
                                     "target of the summed per-response KL")
    kl_horizon: int = arg(10000, "horizon of the adaptive KL controller, in responses")
    gamma: float = arg(1.0, "discount of GAE")
    lam: float = arg(0.95, "λ of GAE")
    cliprange: float = arg(0.2, "ε of the clipped policy ratio")
    cliprange_value: float = arg(0.2, "clip of the value update around the old values")
    vf_coef: float = arg(0.1, "weight of the value loss")
    whiten_rewards: bool = arg(False, "whiten the per-token rewards over the batch before GAE")
    learning_rate: float = arg(3e-6, "peak learning rate (AdamW) of the policy")
    value_learning_rate: Optional[float] = arg(None, "peak learning rate of the value model (default: "
                                               "--learning_rate, as TRL; OpenRLHF gives the critic its own)")
    value_warmup_steps: int = arg(0, "first steps that train only the value model, so that the policy's first "
                                  "advantages do not come from an untrained value head")
    warmup_steps: int = arg(0, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = arg(1.0, "final learning rate as a fraction of the peak (1: constant)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW β1")
    adam_beta2: float = arg(0.95, "AdamW β2 (0.95 as nanoGPT; TRL's default is 0.999)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (policy and value together)")
    lora_r: int = arg(0, "LoRA rank (peft): train low-rank adapters on --lora_target_modules instead of every "
                      "weight; the output folder gets the merged model, and adapter/ the adapter alone; 0: off")
    lora_alpha: float = arg(32, "LoRA scale alpha: the update is (alpha / r) B A")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input")
    lora_target_modules: str = arg("all-linear", "comma-separated module names (q_proj,v_proj), or all-linear: "
                                   "every linear layer but the output one")
    load_in_4bit: bool = arg(False, "QLoRA: hold the frozen base weights in 4-bit NF4 (bitsandbytes) under the "
                             "--lora_r adapter")
    fsdp: bool = arg(False, "under torchrun, shard the weights, gradients and optimizer state over the ranks (FSDP2) "
                     "instead of a whole copy on each (DDP)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    save_every: int = arg(50, "write checkpoint.pt every this many steps (0: only at the end)")
    save_model_checkpoints: bool = arg(False, "with each --save_every checkpoint, also write a loadable model "
                                       "folder <output_dir>/checkpoint-<step>/")
    report_to: str = arg("none", "also log the metrics to wandb, trackio or tensorboard (comma-separated); none")
    log_completions_every: int = arg(10, "write the sampled completions of every this many steps to "
                                     "<output_dir>/completions.jsonl (prompt, response, score, KL to the reference); 0: off")
    num_completions_to_print: int = arg(1, "of those, how many to print in the log")
    stop_after_steps: int = arg(0, "stop with a checkpoint after this many steps; continue later with --resume")
    resume: bool = arg(False, "continue from <output_dir>/checkpoint.pt")
    seed: int = arg(0, "random seed (prompt order, sampling, minibatch order, a new value head)")
    device: str = arg("auto", "auto, cpu, cuda or mps")
    precision: str = arg("auto", "auto (bf16 where the hardware is fast at it), bf16 or fp32; weights stay fp32")
    trust_remote_code: bool = arg(False, "allow models and tokenizers that run code from their repository")
    chat_template: Optional[str] = arg(None, "Jinja chat template file, for tokenizers without one")

    def __post_init__(self):
        check_args(self, micro_batch_size=at_least(1), kl_coef=at_least(0), value_warmup_steps=at_least(0),
                     value_learning_rate=POSITIVE, gamma=between(0, 1), lam=between(0, 1),
                     cliprange=POSITIVE, cliprange_value=POSITIVE, vf_coef=at_least(0),
                     target_kl=POSITIVE, kl_horizon=at_least(1))
        if self.reward == "model" and not self.reward_model:
            raise UserError("--reward model needs --reward_model PATH (a reward_model.py output), or use --reward verifiable")


# ----------------------------------------------------------------------------------------------------------------
# The algorithm: per-token rewards, GAE, whitening, the clipped losses. Pure functions of tensors.
def per_token_rewards(scores, logp, ref_logp, mask, kl_coef):
    """[detail: the KL penalty as a per-token reward] -β (log π_old - log π_ref) at every response token (k1), and
    the sequence score is added at the LAST real token of each response. scores: (N,); logp, ref_logp, mask: (N, T)
    right-padded responses. Returns (N, T) rewards (0 on padding) and the (N, T) per-token k1 KL."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # index of each response's last token
    rewards[torch.arange(len(scores), device=mask.device), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over response tokens (Schulman et al. 2016), without a loop over time:
    δ_t = r_t + γ V_{t+1} - V_t (V = 0 past the last token) and A_t = Σ_{k≥t} (γλ)^{k-t} δ_k, an upper-triangular
    (T, T) discount matrix applied to δ. rewards, values, mask: (N, T), right-padded. Returns (advantages, returns),
    returns = A + V, both 0 on padding."""
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    delta = (rewards + gamma * next_values - values) * mask  # (N, T)
    T = rewards.shape[1]
    k = torch.arange(T, device=rewards.device, dtype=torch.float64)
    power = k[None, :] - k[:, None]  # power[t, j] = j - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros(()).double())
    advantages = (delta.double() @ discount.T).float() * mask  # A[:, t] = Σ_j (γλ)^{j-t} δ[:, j]
    return advantages, (advantages + values) * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """[detail: masked whitening] Whitening over the batch within the mask: (x - mean) / std over the real tokens
    only. shift_mean False keeps the mean (TRL's reward whitening). Padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)  # unbiased, as TRL
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def policy_loss(logp, old_logp, advantages, mask, cliprange):
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7) per token, averaged over the real tokens: max(-A ρ, -A clip(ρ, 1-ε, 1+ε)). Returns (loss, clipfrac,
    approxkl = ½ E[(log ρ)²])."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    clipfrac = masked_mean((-advantages * ratio < losses).float(), mask)
    return masked_mean(losses, mask), clipfrac, 0.5 * masked_mean(log_ratio ** 2, mask)


def value_loss(values, old_values, returns, mask, cliprange_value):
    """[detail: value function clipping] ½ max((V - R)², (clip(V, V_old ± c) - R)²), averaged over real tokens.
    Returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(a, b), mask), masked_mean((b > a).float(), mask)


class AdaptiveKL:
    """Ziegler et al. 2019's controller: β *= 1 + clip(KL / target - 1, ±0.2) x responses / horizon."""

    def __init__(self, kl_coef, target, horizon):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl, n):
        if self.target:
            self.value *= 1 + max(-0.2, min(0.2, kl / self.target - 1)) * n / self.horizon


# ----------------------------------------------------------------------------------------------------------------
# Models
def token_values(value_model, prompt_ids, prompt_mask, response_ids, response_mask, rt):
    """(N, T) values V(s_t) of the states before each response token: the scalar head on the hidden state at the
    position that predicts token t (the prompt is left-padded, so position ids come from the mask)."""
    x, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    T = response_ids.shape[1]
    value_model = models.unwrap(value_model)  # LoRA (peft): its layers stay in the model unwrapped
    with rt.autocast():
        hidden = value_model.base_model(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                        use_cache=False).last_hidden_state[:, -T - 1 : -1]  # (N, T, d)
        head = value_model.score if hasattr(value_model, "score") else value_model.classifier
        return head(hidden).squeeze(-1).float()


class PolicyAndValue(torch.nn.Module):
    """The two trained models in one module, so that DDP syncs both and one optimizer steps both (as TRL does)."""

    def __init__(self, policy, value, rt, temperature):
        super().__init__()
        self.policy, self.value, self.rt, self.temperature = policy, value, rt, temperature

    def forward(self, P, P_mask, Y, Y_mask, with_entropy=False):
        logp, entropy = common.completion_logprobs(self.policy, P, P_mask, Y, Y_mask, self.rt, self.temperature, with_entropy)
        return logp, token_values(self.value, P, P_mask, Y, Y_mask, self.rt), entropy


def load_value_model(path, args, rt):
    model, info = models.load_model(path, rt, args.trust_remote_code, cls=AutoModelForSequenceClassification,
                               load_in_4bit=args.load_in_4bit, device="cpu" if args.fsdp else None, num_labels=1,
                               output_loading_info=True)
    head = model.score if hasattr(model, "score") else model.classifier
    if any(k.startswith(("score.", "classifier.")) for k in info["missing_keys"]):
        # [detail: scalar head initialisation] std 1/sqrt(d_model + 1), so values are O(1) at any width.
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    return model


def response_scores(prompts, texts, answers, ids, args, tok, rt, rm=None, rm_tok=None, rule=None, rule_kw=None):
    """The sequence score of each response, before the KL penalty: the reward model's (it reads prompt + response
    in its own chat format, at the last real token), a user's rule's (called as TRL calls a reward function, with
    rule_kw: tasks.reward_kwargs), or grpo.py's verifiable reward; minus --missing_eos_penalty where a response never
    emitted EOS. Returns (N,) scores, the (N,) scores before that penalty, the (N,) bool "emitted EOS" and how many
    responses the rule failed on (scored 0: tasks.call_reward)."""
    failed = 0
    if rm is not None:
        s = common.score_responses(rm, rm_tok, prompts, texts, rt)
        if not torch.isfinite(s).all():
            raise UserError(f"--reward_model {args.reward_model} scored a response nan or inf; check that model")
    elif rule is not None:
        s, failed = tasks.call_reward(rule, args.reward, len(texts), **rule_kw)
        s = torch.tensor(s)
    else:
        s = torch.tensor([float(c) + args.format_weight * float(b)
                          for b, c in (tasks.grade(t, a, args.grader) for t, a in zip(texts, answers))])
    # [detail: EOS trick] A response that never emitted EOS (it hit --max_new_tokens) gets a penalty.
    eos = torch.tensor([tok.eos_token_id in r for r in ids])
    return s - args.missing_eos_penalty * (~eos).float(), s, eos, failed


# ----------------------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args)
    rule = None
    if args.reward not in ("model", "verifiable"):
        rule = tasks.load_function(args.reward, f"--reward {args.reward}: choose model (with --reward_model), verifiable or")
    rt = common.setup(args.seed, args.device, args.precision)
    if args.batch_size % (rt.world_size * args.num_mini_batches):
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of ranks x --num_mini_batches "
                        f"({rt.world_size} x {args.num_mini_batches})")
    ckpt_path = runs.claim_output_dir(args, rt)

    path = models.resolve_model(args.model, rt)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    sources, graded, order = data.load_prompts(args, tok, rt, need_answers="--reward verifiable"
                                            if args.reward == "verifiable" else None)

    # The four models. Dropout is off in all of them ([detail: dropout disabled], models.load_model), the reference and
    # reward model are frozen in inference mode with no optimizer state; only the policy and value model are trained.
    # With LoRA (--lora_r) the reference is the policy with its adapter off (models.adapter_off): one model in memory.
    policy = models.load_trained(path, rt, args)
    ref = policy if args.lora_r else models.load_frozen(path, rt, args.trust_remote_code)
    rm = rm_tok = None
    if args.reward == "model":
        rm_path = models.resolve_model(args.reward_model, rt)
        models.check_same_vocab(tok, rm_path, "--reward_model", args.trust_remote_code)
        rm = models.load_reward_model(rm_path, rt, args.trust_remote_code)
        rm_tok = models.load_tokenizer(rm_path, args.trust_remote_code)
    value_path = models.resolve_model(args.value_model, rt) if args.value_model else rm_path if rm is not None else path
    value = models.add_lora(load_value_model(value_path, args, rt), args, task_type="SEQ_CLS")  # SEQ_CLS: the head trains
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        value.gradient_checkpointing_enable()
    model = PolicyAndValue(policy, value, rt, args.temperature)
    ddp = common.distribute(model, args, rt)  # DDP or FSDP under torchrun; before the optimizer (FSDP shards the weights)
    value_lr = args.value_learning_rate or args.learning_rate
    opt, sched = runs.optimizer_and_schedule(model, args, [(policy.parameters(), args.learning_rate),
                                                        (value.parameters(), value_lr)])
    kl_ctl = AdaptiveKL(args.kl_coef, args.target_kl, args.kl_horizon)
    step = 0
    if args.resume:
        state = runs.restore_state(ckpt_path, model, opt, sched, args, rt)
        step, kl_ctl.value = state["step"], state["kl_coef"]
    log = runs.begin_log(args, rt, step)
    samples = runs.SampleLog(args.output_dir, rt, step, args.num_completions_to_print)

    @common.unsharded(model)  # FSDP: whole weights on each rank while sampling, which needs no collective
    def evaluate():
        if not graded:
            return {}
        out, texts = tasks.evaluate_answers(policy, tok, [p for p, _ in graded], [a for _, a in graded], rt,
                                        args.max_new_tokens, args.generation_batch_size, grader=args.grader)
        if rm is not None:  # the reward model's mean score of the same greedy held-out answers
            s = common.score_responses(rm, rm_tok, [p for p, _ in graded[rt.rank :: rt.world_size]], texts, rt)
            out["eval/score"] = common.all_reduce(s.sum().to(rt.device), rt).item() / len(graded)
        return out

    if step == 0 and graded:
        row = {"step": 0, **evaluate()}
        log.log(row)
        rt.print("before training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))

    dev, row = rt.device, {}
    last = min(args.max_steps, step + args.stop_after_steps) if args.stop_after_steps else args.max_steps
    bar = tqdm(total=args.max_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True)
    while step < last:
        # ---- [algorithm] Rollout: one response per prompt, with the KV cache; scores, KL-penalised rewards, GAE ----
        t0 = time.perf_counter()
        picked = order[step * args.batch_size : (step + 1) * args.batch_size][rt.rank :: rt.world_size]
        prompts, prompt_ids, answers = (list(x) for x in zip(*[sources[s][i] for s, i in picked]))
        with common.unsharded(model):  # FSDP: whole weights on each rank while sampling, which needs no collective
            ids = common.generate_ids(policy, tok, prompt_ids, rt, args.max_new_tokens, args.generation_batch_size,
                                 args.temperature, args.top_p)
        texts = [tok.decode(r, skip_special_tokens=True) for r in ids]
        t_gen = time.perf_counter() - t0

        # [detail: left padding for generation] Prompts left-padded, responses right-padded, position ids from the mask.
        P, P_mask = (t.to(dev) for t in common.pad(prompt_ids, tok.pad_token_id, side="left"))
        Y, Y_mask = (t.to(dev) for t in common.pad(ids, tok.pad_token_id))  # the mask covers each completion up to its EOS, inclusive
        mask = Y_mask.float()
        N = len(ids)
        micro = [slice(i, i + args.micro_batch_size) for i in range(0, N, args.micro_batch_size)]
        rule_kw, logged, extra = None, {}, {}  # logged, extra: what a user's rule logs with log_metric, log_extra
        if rule is not None:  # what TRL passes a reward function: the prompts, completions, every dataset column...
            rule_kw = tasks.reward_kwargs([sources[s].row(i) for s, i in picked], prompts, texts, ids, step, args.max_steps,
                                      logged, extra)
        with torch.no_grad():
            scores, raw_scores, eos, failed = response_scores(prompts, texts, answers, ids, args, tok, rt, rm, rm_tok,
                                                              rule, rule_kw)
            scores, raw_scores, eos = scores.to(dev), raw_scores.to(dev), eos.to(dev)
            old_logp, old_values = (torch.cat(x) for x in zip(*[model(P[mb], P_mask[mb], Y[mb], Y_mask[mb])[:2] for mb in micro]))
            with models.adapter_off(ref):  # [detail: temperature in the log-probs]
                ref_logp = torch.cat([common.completion_logprobs(ref, P[mb], P_mask[mb], Y[mb], Y_mask[mb], rt,
                                                            args.temperature)[0] for mb in micro])
            rewards, kl = per_token_rewards(scores, old_logp, ref_logp, mask, kl_ctl.value)
            if args.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
            # [detail: advantage whitening] Over the batch, within the response mask; under DDP, over this rank's batch.
            advantages = masked_whiten(advantages, mask)

        # ---- [algorithm] PPO epochs over shuffled minibatches ------------------------------------------------------
        t1 = time.perf_counter()
        sums = dict.fromkeys(("loss/policy", "loss/value", "policy/clipfrac", "val/clipfrac", "policy/approxkl"), 0.0)
        entropy = entropy_tokens = 0.0
        per_mini = N // args.num_mini_batches
        for epoch in range(args.num_ppo_epochs):
            perm = torch.randperm(N, device=dev)
            for m in range(args.num_mini_batches):
                idx = perm[m * per_mini : (m + 1) * per_mini]
                parts = [idx[i : i + args.micro_batch_size] for i in range(0, len(idx), args.micro_batch_size)]
                n_tok = common.all_reduce(mask[idx].sum(), rt).clamp(min=1)  # the minibatch's tokens, over all ranks
                for k, j in enumerate(parts):
                    with common.no_sync(ddp, k < len(parts) - 1):
                        logp, values, ent = ddp(P[j], P_mask[j], Y[j], Y_mask[j], with_entropy=epoch == 0)
                        w = mask[j].sum() / n_tok * rt.world_size  # this micro-batch's share of the token mean
                        pg, pg_clip, approxkl = policy_loss(logp, old_logp[j], advantages[j], mask[j], args.cliprange)
                        vf, vf_clip = value_loss(values, old_values[j], returns[j], mask[j], args.cliprange_value)
                        pg_weight = float(step >= args.value_warmup_steps)  # 0: the value model's warm-up
                        ((pg_weight * pg + args.vf_coef * vf) * w).backward()
                    with torch.no_grad():  # token means over the minibatch (all ranks), summed over the updates
                        for name, v in zip(sums, (pg, vf, pg_clip, vf_clip, approxkl)):
                            sums[name] += v * w / rt.world_size
                        if ent is not None:  # the first epoch sees every token once
                            entropy, entropy_tokens = entropy + (ent * mask[j]).sum(), entropy_tokens + mask[j].sum()
                common.clip_grad_norm(model, args.max_grad_norm)  # [detail: gradient clipping]
                opt.step()
                runs.report_memory(model, opt, rt)  # once: what a rank holds
                opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        t_train = time.perf_counter() - t1

        # ---- [plumbing] Metrics: sums over this rank's responses, reduced over ranks in one call -------------------
        with torch.no_grad():
            err = returns - old_values
            sums.update({"entropy": entropy, "entropy_tokens": entropy_tokens, "scores": scores.sum(),
                         "raw_scores": raw_scores.sum(), "kl": kl.sum(), "eos": eos.float().sum(), "tokens": mask.sum(),
                         "responses": N, "returns": (returns * mask).sum(), "returns_sq": (returns ** 2 * mask).sum(),
                         "errors": (err * mask).sum(), "errors_sq": (err ** 2 * mask).sum(), "failed": failed})
            sums = common.all_reduce_sums(sums, rt)
        updates, n, tokens = args.num_ppo_epochs * args.num_mini_batches, sums["responses"], sums["tokens"]
        var_returns = sums["returns_sq"] / tokens - (sums["returns"] / tokens) ** 2
        var_errors = sums["errors_sq"] / tokens - (sums["errors"] / tokens) ** 2  # Var(returns - values)
        row = {"step": step, "objective/scores": sums["scores"] / n, "objective/raw_scores": sums["raw_scores"] / n,
               "objective/kl": sums["kl"] / n, "objective/kl_per_token": sums["kl"] / tokens,
               "objective/non_score_reward": -kl_ctl.value * sums["kl"] / n,
               "objective/rlhf_reward": (sums["scores"] - kl_ctl.value * sums["kl"]) / n,
               "objective/entropy": sums["entropy"] / max(sums["entropy_tokens"], 1.0),
               **{k: sums[k] / updates for k in ("policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value",
                                                 "val/clipfrac")},
               "val/explained_variance": 1 - var_errors / max(var_returns, 1e-8),
               "eos_fraction": sums["eos"] / n, "completions/mean_length": tokens / n,
               "kl_coef": kl_ctl.value, "learning_rate": lr, "time/generate_s": t_gen, "time/score_s": t1 - t0 - t_gen,
               "time/train_s": t_train, "seconds_per_step": time.perf_counter() - t0,
               **({"reward_errors": int(sums["failed"])} if rule is not None else {}),
               **{name: sum(v) / len(v) for name, v in logged.items()}}  # a rule's log_metric: this rank's
        kl_ctl.update(row["objective/kl"], n)
        if not math.isfinite(row["loss/policy"]) or not math.isfinite(row["loss/value"]):
            raise Diverged(f"the loss became {row['loss/policy']} (policy) / {row['loss/value']} (value) at step {step}")
        if graded and ((args.eval_every and step % args.eval_every == 0) or step == args.max_steps):
            row.update(evaluate())
        log.log(row)
        if args.log_completions_every and step % args.log_completions_every == 0:
            extra = {k: v for k, v in extra.items() if len(v) == N}
            samples.log(step, [{"prompt": p, "completion": t, "score": s, "kl": k, **{c: v[i] for c, v in extra.items()}}
                               for i, (p, t, s, k) in enumerate(zip(prompts, texts, scores.tolist(), kl.sum(1).tolist()))])
        bar.update(1)
        bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.3f}",
                        gen_s=f"{t_gen:.0f}", train_s=f"{t_train:.0f}")
        if (args.save_every and step % args.save_every == 0) or step == last:
            runs.save_state(ckpt_path, model, opt, sched, step, args, rt, kl_coef=kl_ctl.value)
            runs.save_checkpoint_model(policy, tok, args, step, rt)
    bar.close()

    if step == args.max_steps:
        runs.save_pretrained(policy, tok, args.output_dir, rt)
        if any(k.startswith("eval") for k in row):
            rt.print("after training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith("eval")))
        rt.print(f"saved the policy to {args.output_dir}")
    else:
        rt.print(f"stopped at step {step} of {args.max_steps}; continue with --resume")
    runs.finish(rt)


if __name__ == "__main__":
    runs.run(main)
