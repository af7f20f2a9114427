"""GRPO: group-relative policy optimisation with verifiable rewards (RLVR).

For each prompt x the policy samples a group of G completions y_1..y_G and each gets a reward r_i. The advantage of
a completion is its reward against its own group's (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2):

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + ε)

and every token of y_i is pushed by A_i through PPO's clipped ratio (Schulman et al. 2017, arXiv:1707.06347,
Eq. 7), with a KL penalty to a frozen reference (DeepSeekMath Eq. 3, and Eq. 4 for D_KL):

    J(θ) = 1/G Σ_i 1/|y_i| Σ_t [ min(ρ_it A_i, clip(ρ_it, 1-ε, 1+ε_high) A_i) - β D_KL,t ],
    ρ_it = π_θ(y_it | x, y_i<t) / π_old(y_it | x, y_i<t),
    D_KL,t = π_ref/π_θ - log(π_ref/π_θ) - 1          (the k3 estimator, ≥ 0, unbiased on samples of π_θ:
                                                       Schulman 2020, "Approximating KL divergence")

The default reward is verifiable (RLVR: Lambert et al. 2024, Tülu 3, arXiv:2411.15124; accuracy and format rules as
in DeepSeek-R1, Guo et al. 2025, arXiv:2501.12948, §2.2.2): r = 1[the last \\boxed{} equals the answer]
+ λ_fmt 1[there is a \\boxed{} answer], λ_fmt = 0.2 (our choice). Other rule functions (a file.py:function, written for
TRL: they get the same keywords, the dataset's columns among them), and a reward model trained by reward_model.py
(--reward_model), can be added with weights. --grader math_verify grades symbolic answers (\\frac{\\pi}{2} = \\pi/2).

How this deviates from the equation as written, and from TRL:
- --loss_type grpo (default) is DeepSeekMath's 1/|y_i| per-completion mean; `dapo` normalises by the tokens of
  the whole batch (Yu et al. 2025, arXiv:2503.14476, §3.3; TRL's default), `dr_grpo` by a constant (completions x
  max_new_tokens); use it with --scale_rewards none (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783, removes both
  the length and the std normalisation).
- The std in A_i is the population std (divide by G). TRL's is Bessel-corrected (G - 1), so TRL's advantages are
  sqrt((G - 1) / G) times ours (0.94x at G = 8); ε = 1e-4.
- The k3 term's gradient is, in expectation, that of KL(π_ref || π_θ), not KL(π_θ || π_ref), as in TRL,
  DeepSeekMath and verl.
- --importance_sampling_level sequence is GSPO (Zheng et al. 2025, arXiv:2507.18071): one ratio per completion,
  s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|), clipped per sequence, in place of ρ_it (TRL's
  importance_sampling_level="sequence"). With μ = 1 both ratios are 1 and the two give the same gradient.
- β defaults to 0.05 (DeepSeekMath: 0.04; TRL: 0, and then no reference model is loaded, as here with --beta 0).
  With LoRA (--lora_r) the reference is the policy with its adapter switched off: one model in memory, not two.
- DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, §3.2) is on by default (TRL: off): a group whose
  rewards are all equal has zero advantages and teaches nothing, so it is replaced by a freshly sampled one. On the
  built-in arithmetic_mixed task it took GRPO from +7.8 to +12.7 held-out points (README, Results).
- One step = one batch of --batch_size prompts x --num_generations completions, sampled once and then used for
  --num_iterations optimizer updates (μ in the GRPO paper) against the stored log-probs of the sampling policy.
- Every log-prob (sampling policy, current policy, reference) is computed from logits / --temperature, the
  distribution that was actually sampled. With --top_p < 1 the log-probs are still those of the whole
  distribution, not of the truncated one that was sampled (as in TRL).

    python grpo.py --model out/sft                   # the built-in arithmetic task, after python sft.py
    python grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --dataset_config main \\
        --eval_split test --max_new_tokens 512
    torchrun --nproc_per_node=2 grpo.py ...          # DDP, same code path
    torchrun --nproc_per_node=2 grpo.py ... --fsdp   # FSDP2: weights, gradients, AdamW state sharded
"""
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

import common as C
import data as D
import models as M
import runs as R
import tasks as T
from runs import UserError, arg


@dataclass
class Args:
    model: str = arg(M.DEFAULT_MODEL, "Hub id, local checkpoint folder (e.g. sft.py's --output_dir) or .gguf file")
    dataset: str = arg("arithmetic", "built-in task name, local .jsonl/.json/.parquet/.csv, or Hub id; comma-separated "
                       "for a mixture. Rows need a `prompt` or `question` and, for the accuracy reward, an `answer` "
                       "(GSM8K's '#### 42' is understood) or a `solution` with a \\boxed{}")
    dataset_weights: str = arg("", "sampling weights of a mixture, comma-separated (default: equal)")
    dataset_split: str = arg("train", "split of Hub datasets to train on")
    dataset_config: Optional[str] = arg(None, "config (subset) name of Hub datasets (openai/gsm8k needs main)")
    eval_split: Optional[str] = arg(None, "held-out split of the first dataset; default: hold out --eval_size "
                                    "training rows (the built-in task has its own disjoint held-out problems)")
    eval_size: int = arg(64, "held-out prompts answered greedily to measure accuracy (pass@1); 0: off")
    grader: str = arg("exact", "how answers are graded: exact (numbers exactly) or math_verify (also equal as "
                      "mathematics, by the math-verify library: pip install math-verify)")
    eval_every: int = arg(5, "measure held-out accuracy every this many steps (and at start and end; 0: only those)")
    output_dir: str = arg("out/grpo", "where the final model, args.json, metrics.jsonl and checkpoint.pt go")
    overwrite_output_dir: bool = arg(False, "replace the run an --output_dir already holds (without it: refused)")
    max_steps: int = arg(20, "steps; each samples one batch and makes --num_iterations optimizer updates on it")
    batch_size: int = arg(8, "PROMPTS per step over all ranks; each gets --num_generations completions, so a step "
                          "trains on batch_size x num_generations completions")
    num_generations: int = arg(8, "completions per prompt: the group G")
    generation_batch_size: int = arg(64, "completions sampled together in one generate call (KV cache)")
    micro_batch_size: int = arg(16, "completions per forward/backward pass; a multiple of --num_generations lets each "
                                "group's prompt go through the model once")
    max_new_tokens: int = arg(96, "length limit of a completion (sampled and greedy)")
    max_prompt_length: int = arg(512, "prompts with more tokens than this are dropped (and counted)")
    temperature: float = arg(1.0, "sampling temperature; every log-prob uses logits / temperature")
    top_p: float = arg(1.0, "nucleus sampling")
    learning_rate: float = arg(1e-5, "peak learning rate (AdamW)")
    warmup_steps: int = arg(0, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = arg(1.0, "final learning rate as a fraction of the peak (1: constant)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW β1")
    adam_beta2: float = arg(0.95, "AdamW β2 (0.95 as nanoGPT; TRL's default is 0.999)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    beta: float = arg(0.05, "weight of the k3 KL to the reference (β of DeepSeekMath Eq. 3); 0 loads no reference model")
    epsilon: float = arg(0.2, "clip range below: the ratio is clipped at 1 - epsilon")
    epsilon_high: float = arg(0.2, "clip range above: at 1 + epsilon_high (DAPO's clip-higher uses 0.28)")
    importance_sampling_level: str = arg("token", "token (GRPO: a ratio per token) or sequence (GSPO: one ratio per "
                                         "completion, the geometric mean of its tokens'; the GSPO paper clips it "
                                         "at --epsilon 3e-4 --epsilon_high 4e-4)")
    num_iterations: int = arg(1, "optimizer updates per sampled batch (μ); >1 reuses it with the stored old log-probs")
    loss_type: str = arg("grpo", "grpo (DeepSeekMath: mean over each completion's tokens, then over completions), "
                         "dapo (over the batch's tokens), dr_grpo (sum / (completions x max_new_tokens))")
    scale_rewards: str = arg("group", "divide advantages by the std of the group, of the whole batch, or none "
                             "(Dr. GRPO)")
    dynamic_sampling: bool = arg(True, "DAPO's dynamic sampling: drop groups whose rewards are all equal (their "
                                 "advantages are 0) and sample fresh prompts in their place, up to "
                                 "--max_resample_rounds more rounds per step; a batch still short is filled up with "
                                 "dropped groups. On by default (TRL: off); --no_dynamic_sampling trains on every "
                                 "group sampled once")
    max_resample_rounds: int = arg(3, "with --dynamic_sampling: extra sampling rounds per step, at most")
    mask_truncated_completions: bool = arg(False, "leave completions that hit --max_new_tokens without stopping "
                                           "out of the loss")
    reward_funcs: str = arg("accuracy,format", "comma-separated rule rewards: accuracy (1 if the last \\boxed{} "
                            "is right), format (1 if there is a \\boxed{}), or path/to/file.py:function, called as "
                            "TRL calls a reward function: f(prompts=, completions=, completion_ids=, every dataset "
                            "column, **kwargs) -> a float (or None) per completion")
    reward_weights: str = arg("", "weights of --reward_funcs, comma-separated (default: 1 each, 0.2 for format: "
                              "λ_fmt)")
    reward_model: Optional[str] = arg(None, "a reward_model.py output folder, added as one more reward")
    reward_model_weight: float = arg(1.0, "weight of --reward_model's score")
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
                                     "<output_dir>/completions.jsonl (prompt, completion, each reward, advantage); 0: off")
    num_completions_to_print: int = arg(1, "of those, how many to print in the log")
    stop_after_steps: int = arg(0, "stop with a checkpoint after this many steps of this invocation; continue "
                                "later with --resume")
    resume: bool = arg(False, "continue from <output_dir>/checkpoint.pt")
    seed: int = arg(0, "random seed (prompt order, sampling)")
    device: str = arg("auto", "auto, cpu, cuda or mps")
    precision: str = arg("auto", "auto (bf16 where the hardware is fast at it), bf16 or fp32; weights stay fp32")
    trust_remote_code: bool = arg(False, "allow models and tokenizers that run code from their repository")
    chat_template: Optional[str] = arg(None, "Jinja chat template file, for tokenizers without one")

    def __post_init__(self):
        if self.loss_type not in ("grpo", "dapo", "dr_grpo"):
            raise UserError(f"--loss_type {self.loss_type}: choose grpo, dapo or dr_grpo")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise UserError(f"--importance_sampling_level {self.importance_sampling_level}: choose token or sequence")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise UserError(f"--scale_rewards {self.scale_rewards}: choose group, batch or none")
        R.check_args(self, micro_batch_size=R.at_least(1), num_generations=R.at_least(2), beta=R.at_least(0),
                     epsilon=R.at_least(0), epsilon_high=R.at_least(0), max_resample_rounds=R.at_least(0))
        if not self.reward_funcs.strip(", ") and not self.reward_model:
            raise UserError("no reward: give --reward_funcs, --reward_model or both")


# ----------------------------------------------------------------------------------------------------------------
# The algorithm: advantages, the per-token objective, and its aggregation. Pure functions of tensors.
def group_advantages(rewards, group_size, scale_rewards="group", eps=1e-4, batch_std=None):
    """DeepSeekMath §4.1.2. rewards: (N,) with the G = group_size completions of each prompt contiguous -> (N,) advantages.
    group: (r - group mean) / (group std + eps), std over the group (population: TRL's is Bessel-corrected);
    batch: the group mean, but the std of the whole batch (batch_std when given, e.g. over DDP ranks);
    none:  r - group mean (Dr. GRPO). A group whose rewards are all equal gets zero advantages."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (r.std(1, unbiased=False, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / ((rewards.std(unbiased=False) if batch_std is None else batch_std) + eps)
    return centred.view(-1)


def per_token_loss(logp, old_logp, ref_logp, advantages, epsilon, epsilon_high, beta, mask=None, level="token"):
    """DeepSeekMath Eq. 3's objective, negated, per token. logp, old_logp, ref_logp: (N, T) log-probs of the sampled
    tokens under π_θ, π_old, π_ref (ref_logp None when beta is 0); advantages: (N,). Returns (N, T) loss, (N, T) k3
    KL (zeros without a reference), and the (N, T) booleans where the clip engaged below and above.
    level "sequence" is GSPO: every token of y_i carries the one ratio s_i of its sequence (mask: (N, T), its tokens)."""
    log_ratio = logp - old_logp
    if level == "sequence":
        # GSPO (Zheng et al. 2025, arXiv:2507.18071, Eq. 7): s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|), the exp of
        # the mean token log-ratio, clipped per sequence (Eq. 5).
        log_ratio = ((log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(logp)
    ratio = torch.exp(log_ratio)  # ρ_it, or s_i at every token of y_i
    A = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * A, clipped * A)  # the clipped surrogate: no incentive to move ρ past the clip range
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3: π_ref/π_θ - log(π_ref/π_θ) - 1
        loss = loss + beta * kl
    else:
        kl = torch.zeros_like(logp)
    # Where the min picked the clipped term, the token gives no gradient: below for A < 0, above for A > 0.
    low, high = (ratio < 1 - epsilon) & (A < 0), (ratio > 1 + epsilon_high) & (A > 0)
    return loss, kl, low, high


def aggregate(loss, mask, loss_type, num_completions, num_tokens, max_new_tokens):
    """This micro-batch's share of the batch loss. loss, mask: (n, T). The normalisers are over the WHOLE batch
    (all micro-batches and ranks), so the gradient does not depend on how the batch is split:
    grpo:    1/N Σ_i 1/|y_i| Σ_t loss_it      (DeepSeekMath Eq. 3; per completion, then over completions)
    dapo:    Σ_it loss_it / Σ_i |y_i|          (each token weighs the same: long completions are not diluted)
    dr_grpo: Σ_it loss_it / (N · max_new_tokens) (a constant: no length bias at all)"""
    loss = loss * mask
    if loss_type == "grpo":
        return (loss.sum(1) / mask.sum(1).clamp(min=1)).sum() / num_completions
    if loss_type == "dapo":
        return loss.sum() / num_tokens
    if loss_type == "dr_grpo":
        return loss.sum() / (num_completions * max_new_tokens)
    raise ValueError(loss_type)


# ----------------------------------------------------------------------------------------------------------------
# Rewards: rule functions, an optional reward model; a function that raises scores 0 and is counted
def accuracy_reward(completions, answer, grader="exact", **kw):
    return [float(T.grade(c, a, grader)[1]) if a is not None else 0.0 for c, a in zip(completions, answer)]


def format_reward(completions, **kw):
    return [float(T.last_boxed(c) is not None) for c in completions]


BUILTIN_REWARDS = {"accuracy": accuracy_reward, "format": format_reward}


def load_reward_funcs(spec, weights_spec):
    """'accuracy,format,rules.py:fn' -> [(name, function, weight)]."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    funcs = []
    for name in names:
        if name in BUILTIN_REWARDS:
            funcs.append(BUILTIN_REWARDS[name])
            continue
        funcs.append(T.load_function(name, f"--reward_funcs {name}: not a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor"))
    if weights_spec:
        try:
            weights = [float(w) for w in weights_spec.split(",")]
        except ValueError:
            raise UserError(f"--reward_weights {weights_spec}: give numbers separated by commas") from None
        if len(weights) != len(names):
            raise UserError(f"--reward_weights has {len(weights)} numbers for {len(names)} --reward_funcs")
    else:
        weights = [0.2 if n == "format" else 1.0 for n in names]  # λ_fmt = 0.2
    return [(n.rpartition(":")[2], f, w) for n, f, w in zip(names, funcs, weights)]


# ----------------------------------------------------------------------------------------------------------------
def main():
    args = R.parse_args(Args)
    rt = C.setup(args.seed, args.device, args.precision)
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch_size {args.batch_size} (prompts) must be a multiple of the {rt.world_size} ranks")
    reward_funcs = load_reward_funcs(args.reward_funcs, args.reward_weights)
    ckpt_path = R.claim_output_dir(args, rt)

    # Data: prompts and answers; the held-out prompts with an answer are graded greedily (pass@1).
    path = M.resolve_model(args.model, rt)
    tok = M.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    accuracy = any(f is accuracy_reward for _, f, _ in reward_funcs)
    # Each prompt: its messages (a plain-string question gets T.BOX_INSTRUCTION appended unless it mentions \boxed),
    # their token ids with the assistant header, and its ground truth; graded: held-out (prompt, answer) pairs.
    sources, graded, order = D.load_prompts(args, tok, rt, need_answers="the accuracy reward" if accuracy else None,
                                            reads_per_step=1 + args.max_resample_rounds * args.dynamic_sampling)

    # Models: the policy (trained), the frozen reference (only if beta > 0; with LoRA the policy with its adapter off,
    # M.adapter_off), the reward model (if any)
    model = M.load_trained(path, rt, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ref = None
    if args.beta > 0:
        ref = model if args.lora_r else M.load_frozen(path, rt, args.trust_remote_code)
    rm = None
    if args.reward_model:
        rm_path = M.resolve_model(args.reward_model, rt)
        rm = M.load_reward_model(rm_path, rt, args.trust_remote_code)
        rm_tok = M.load_tokenizer(rm_path, args.trust_remote_code)
    ddp = C.distribute(model, args, rt)  # DDP or FSDP under torchrun; before the optimizer (FSDP shards the weights)
    opt, sched = C.optimizer_and_schedule(model, args)
    step, cursor = 0, 0  # cursor: how far the prompt stream has been read (further than step x batch_size with
    if args.resume:      # --dynamic_sampling)
        state = R.restore_state(ckpt_path, model, opt, sched, args, rt,  # these change the loss or the prompt stream
                                must_match=("loss_type", "beta", "dynamic_sampling", "max_resample_rounds",
                                            "importance_sampling_level"))
        step, cursor = state["step"], state.get("cursor", state["step"] * args.batch_size)
    log = R.begin_log(args, rt, step)
    samples = R.SampleLog(args.output_dir, rt, step, args.num_completions_to_print)

    @C.unsharded(model)  # FSDP: whole weights on each rank while sampling, which needs no collective
    def evaluate():
        return C.evaluate_answers(model, tok, [p for p, _ in graded], [a for _, a in graded], rt,
                                  args.max_new_tokens, args.generation_batch_size, grader=args.grader)[0] if graded else {}

    if step == 0 and graded:
        row = {"step": 0, **evaluate()}
        log.log(row)
        rt.print("before training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))

    G, dev, row, logged = args.num_generations, rt.device, {}, {}  # logged: a user's function's log_metric values
    reward_names = [name for name, _, _ in reward_funcs] + (["reward_model"] if rm is not None else [])
    weights = torch.tensor([w for _, _, w in reward_funcs] + ([args.reward_model_weight] if rm is not None else []))

    def rollout(cursor):
        """Sample G completions for each of this rank's prompts at position `cursor` of the prompt stream and score
        them: a list of groups {"prompt_ids", "completion_ids", "sampled_logp": G lists each, "per_func": (G, K)
        rewards of each function, "rewards": (G,) their weighted sum, and for completions.jsonl "prompt", "texts",
        "extra"}, the number of reward-function failures, and the seconds spent scoring."""
        picked = order[cursor : cursor + args.batch_size][rt.rank :: rt.world_size]
        mine = [sources[s][i] for s, i in picked]
        prompts = [m for m, _, _ in mine for _ in range(G)]  # each group is contiguous: rows g*G .. g*G+G-1
        prompt_ids = [ids for _, ids, _ in mine for _ in range(G)]
        answers = [a for _, _, a in mine for _ in range(G)]
        with C.unsharded(model):  # FSDP: whole weights on each rank while sampling, which needs no collective
            completion_ids, sampled_logp = C.generate_ids(model, tok, prompt_ids, rt, args.max_new_tokens,
                                                          args.generation_batch_size, args.temperature, args.top_p,
                                                          return_logprobs=True)
        completions = [tok.decode(c, skip_special_tokens=True) for c in completion_ids]
        t = time.perf_counter()
        # The built-in rewards read the texts and the ground truth; a user's function gets what TRL's GRPOTrainer
        # passes (D.reward_kwargs: the prompts, completions and every column of the dataset, ...).
        builtin_kw = {"completions": completions, "answer": answers, "grader": args.grader}
        extra = {}  # columns a user's function adds to completions.jsonl with log_extra(column, values)
        if any(fn not in BUILTIN_REWARDS.values() for _, fn, _ in reward_funcs):
            user_kw = D.reward_kwargs([sources[s].row(i) for s, i in picked for _ in range(G)], prompts, completions,
                                      completion_ids, step, args.max_steps, logged, extra)
        columns, failed = [], 0
        for name, fn, _ in reward_funcs:
            r, f = T.call_reward(fn, name, len(completions), **(builtin_kw if fn in BUILTIN_REWARDS.values() else user_kw))
            columns.append(r)
            failed += f
        if rm is not None:
            columns.append(C.score_responses(rm, rm_tok, prompts, completions, rt).tolist())
            if not all(math.isfinite(v) for v in columns[-1]):
                raise UserError(f"--reward_model {args.reward_model} scored a completion nan or inf; check that model")
        per_func = torch.tensor(columns).T  # (N, K)
        extra = {k: v for k, v in extra.items() if len(v) == len(completions)}
        groups = [{"prompt_ids": prompt_ids[g : g + G], "completion_ids": completion_ids[g : g + G],
                   "sampled_logp": sampled_logp[g : g + G], "per_func": per_func[g : g + G],
                   "rewards": per_func[g : g + G] @ weights, "prompt": prompts[g], "texts": completions[g : g + G],
                   "extra": {k: v[g : g + G] for k, v in extra.items()}} for g in range(0, len(prompts), G)]
        return groups, failed, time.perf_counter() - t

    def flat(group):  # all G rewards equal: every advantage is 0, the group teaches nothing but the KL term
        return group["rewards"].std().item() < 1e-6

    last = min(args.max_steps, step + args.stop_after_steps) if args.stop_after_steps else args.max_steps
    bar = tqdm(total=args.max_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True)
    while step < last:
        # ---- [algorithm] Rollout: G completions per prompt, sampled with the KV cache, and their rewards -----------
        t0 = time.perf_counter()
        groups, failed, t_score = rollout(cursor)
        cursor, sampled, rounds = cursor + args.batch_size, groups, 0
        if args.dynamic_sampling:  # DAPO (Yu et al. 2025, arXiv:2503.14476, §3.2): train on groups that differ
            keep = [g for g in groups if not flat(g)]
            while rounds < args.max_resample_rounds and C.all_reduce(float(len(keep) < len(groups)), rt, op="max").item():
                more, f, t = rollout(cursor)  # every rank takes part in a round while any rank is short
                cursor, rounds, failed, t_score = cursor + args.batch_size, rounds + 1, failed + f, t_score + t
                sampled, keep = sampled + more, keep + [g for g in more if not flat(g)]
            groups = (keep + [g for g in sampled if flat(g)])[: len(groups)]  # short: fill up with flat groups
        prompt_ids = [x for g in groups for x in g["prompt_ids"]]
        completion_ids = [x for g in groups for x in g["completion_ids"]]
        sampled_logp = [x for g in groups for x in g["sampled_logp"]]
        rewards = torch.cat([g["rewards"] for g in groups])
        t_gen = time.perf_counter() - t0 - t_score

        # ---- [algorithm] Advantages within each group (DeepSeekMath §4.1.2) ----------------------------------------
        batch_std = None
        if args.scale_rewards == "batch":  # the std of all rewards of the step, over every rank
            s = C.all_reduce(torch.stack([rewards.sum(), (rewards ** 2).sum(), torch.tensor(float(len(rewards)))]), rt)
            batch_std = (s[1] / s[2] - (s[0] / s[2]) ** 2).clamp(min=0).sqrt()
        advantages = group_advantages(rewards, G, args.scale_rewards, batch_std=batch_std)

        # ---- [plumbing] Tensors in the layout of generation: prompts left-padded, completions right-padded ---------
        P, P_mask = C.pad(prompt_ids, tok.pad_token_id, side="left")
        Y, Y_mask = C.pad(completion_ids, tok.pad_token_id)  # the mask covers each completion up to its EOS, inclusive
        truncated = torch.tensor([tok.eos_token_id not in c for c in completion_ids])  # hit max_new_tokens
        lengths = Y_mask.sum(1)
        if args.mask_truncated_completions:
            Y_mask = Y_mask * (~truncated)[:, None]
        S = C.pad(sampled_logp, 0.0)[0]  # (N, Tc) the log-probs the sampler drew each token with
        P, P_mask, Y, Y_mask, S, advantages = (t.to(dev) for t in (P, P_mask, Y, Y_mask, S, advantages))
        N = len(completion_ids)
        micro = [slice(i, i + args.micro_batch_size) for i in range(0, N, args.micro_batch_size)]
        num_completions = C.all_reduce(float(N), rt).item()
        num_tokens = max(C.all_reduce(Y_mask.sum().float(), rt).item(), 1.0)

        # A micro-batch that holds whole groups computes each group's prompt once (C.completion_logprobs).
        share = G if args.micro_batch_size % G == 0 else 1

        def logps(m, mb, entropy=False):
            return C.completion_logprobs(m, P[mb], P_mask[mb], Y[mb], Y_mask[mb], rt, args.temperature, entropy, share)

        t1 = time.perf_counter()
        with torch.no_grad():  # log-probs of the sampling policy (only needed when a batch is reused) and reference
            old_logp = torch.cat([logps(model, mb)[0] for mb in micro]) if args.num_iterations > 1 else None
            with M.adapter_off(ref):
                ref_logp = torch.cat([logps(ref, mb)[0] for mb in micro]) if ref is not None else None

        # ---- [algorithm] μ optimizer updates on the batch ----------------------------------------------------------
        # Sums for the metrics: loss and clip counts over every update (averaged over the μ updates, as TRL logs
        # them), the rest on the first pass, where the policy is still the one that sampled.
        sums = {k: torch.zeros((), device=dev) for k in ("loss", "clip_low", "clip_high", "kl", "entropy", "tokens",
                                                          "sampler_gap")}
        gap_max = torch.zeros((), device=dev)
        grad_norms = []
        for it in range(args.num_iterations):
            for k, mb in enumerate(micro):
                with C.no_sync(ddp, k < len(micro) - 1):
                    logp, ent = logps(ddp, mb, entropy=it == 0)
                    # With μ = 1 the sampling policy IS the current one: π_old = π_θ detached, the ratio is exactly 1.
                    old = old_logp[mb] if old_logp is not None else logp.detach()
                    m = Y_mask[mb].float()
                    loss, kl, low, high = per_token_loss(logp, old, None if ref_logp is None else ref_logp[mb],
                                                         advantages[mb], args.epsilon, args.epsilon_high, args.beta,
                                                         m, args.importance_sampling_level)
                    part = aggregate(loss, m, args.loss_type, num_completions, num_tokens, args.max_new_tokens)
                    (part * rt.world_size).backward()  # DDP averages over ranks; the normalisers are global already
                sums["loss"] += part.detach() / args.num_iterations
                sums["clip_low"] += (low * m).sum() / args.num_iterations
                sums["clip_high"] += (high * m).sum() / args.num_iterations
                if it == 0:
                    # The sampler and this forward compute the same distribution (same weights, same autocast), but
                    # incrementally with the KV cache: the gap is rounding, logged to show it stays negligible.
                    gap = (logp.detach() - S[mb]).abs() * m
                    gap_max = torch.maximum(gap_max, gap.max())
                    sums["kl"] += (kl * m).sum().detach()
                    sums["entropy"] += (ent * m).sum()
                    sums["tokens"] += m.sum()
                    sums["sampler_gap"] += gap.sum()
            grad_norms.append(C.clip_grad_norm(model, args.max_grad_norm))
            opt.step()
            C.report_memory(model, opt, rt)  # once: what a rank holds
            opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        t_train = time.perf_counter() - t1

        # ---- [plumbing] Metrics, reduced over ranks; held-out evaluation; checkpoint -------------------------------
        sums = C.all_reduce_sums(sums, rt)
        # The reward metrics are over every group sampled this step (with --dynamic_sampling, the dropped too).
        all_rewards = torch.stack([g["rewards"] for g in sampled])  # (groups, G)
        group_std = all_rewards.std(1, unbiased=False)
        counts = {"reward": all_rewards.sum(), "reward_std": group_std.sum(), "zero_std": (group_std < 1e-6).sum(),
                  "length": lengths.sum(), "truncated": truncated.sum(), "failed": failed, "groups": len(sampled),
                  "trained_zero_std": sum(flat(g) for g in groups),
                  **{f"rewards/{n}": v for n, v in zip(reward_names, torch.cat([g["per_func"] for g in sampled]).sum(0))}}
        counts = C.all_reduce_sums(counts, rt)
        n_groups, tokens = counts["groups"], max(sums["tokens"], 1.0)
        row = {"step": step, "loss": sums["loss"], "reward": counts["reward"] / (n_groups * G),
               "reward_std": counts["reward_std"] / n_groups, "frac_reward_zero_std": counts["zero_std"] / n_groups,
               **{f"rewards/{name}/mean": counts[f"rewards/{name}"] / (n_groups * G) for name in reward_names},
               "reward_errors": int(counts["failed"]), "kl": sums["kl"] / tokens, "entropy": sums["entropy"] / tokens,
               "clip_ratio/low_mean": sums["clip_low"] / tokens, "clip_ratio/high_mean": sums["clip_high"] / tokens,
               "sampling/logp_diff_mean": sums["sampler_gap"] / tokens,
               "sampling/logp_diff_max": C.all_reduce(gap_max, rt, op="max").item(),
               "completions/mean_length": counts["length"] / num_completions,
               "completions/clipped_ratio": counts["truncated"] / num_completions,
               "grad_norm": sum(grad_norms) / len(grad_norms), "learning_rate": lr,
               "time/generate_s": t_gen, "time/score_s": t_score, "time/train_s": t_train,
               "seconds_per_step": time.perf_counter() - t0}
        row.update({name: sum(v) / len(v) for name, v in logged.items()})  # this rank's, as TRL logs them
        logged.clear()
        if args.dynamic_sampling:
            row.update({"dynamic_sampling/rounds": rounds,
                        "dynamic_sampling/frac_trained_zero_std": counts["trained_zero_std"] / (num_completions / G)})
        if not all(math.isfinite(row[k]) for k in ("loss", "grad_norm")):
            raise R.Diverged(f"the loss or its gradient became {row['loss']} / {row['grad_norm']} at step {step}")
        if graded and ((args.eval_every and step % args.eval_every == 0) or step == args.max_steps):
            row.update(evaluate())
        log.log(row)
        if args.log_completions_every and step % args.log_completions_every == 0:
            adv = iter(advantages.tolist())
            samples.log(step, [{"prompt": g["prompt"], "completion": text, "reward": r.item(),
                                "rewards": dict(zip(reward_names, f.tolist())), "advantage": next(adv),
                                **{k: v[j] for k, v in g["extra"].items()}}
                               for g in groups for j, (text, r, f) in enumerate(zip(g["texts"], g["rewards"], g["per_func"]))])
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}", len=f"{row['completions/mean_length']:.0f}",
                        gen_s=f"{t_gen:.0f}", train_s=f"{t_train:.0f}")
        if (args.save_every and step % args.save_every == 0) or step == last:
            R.save_state(ckpt_path, model, opt, sched, step, args, rt, cursor=cursor)
            R.save_checkpoint_model(model, tok, args, step, rt)
    bar.close()

    if step == args.max_steps:
        R.save_pretrained(model, tok, args.output_dir, rt)
        if any(k.startswith("eval") for k in row):
            rt.print("after training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith("eval")))
        rt.print(f"saved the model to {args.output_dir}")
    else:
        rt.print(f"stopped at step {step} of {args.max_steps}; continue with --resume")
    R.finish(rt)


if __name__ == "__main__":
    R.run(main)
