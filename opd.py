"""On-policy distillation (OPD): the student samples, a frozen teacher grades every sampled token.

The student π_θ samples completions y ~ π_θ(·|x) for training prompts (batched, with the KV cache),
and the teacher π_T scores the student's own tokens, so the student learns where IT goes wrong, on
its own distribution (unlike SFT on teacher outputs). Two losses:

--loss reverse_kl (default; the RL view: Gu et al. 2024, MiniLLM, https://arxiv.org/abs/2306.08543;
Lu and Thinking Machines Lab 2025, "On-Policy Distillation",
https://thinkingmachines.ai/blog/on-policy-distillation/): every sampled token gets the dense reward
r_t = -(log π_θ(y_t|·) - log π_T(y_t|·)), the per-token reverse KL on the sample, and the policy
gradient is taken with discount 0 (each token's advantage is its own reward; later tokens' rewards
are not summed in, as in the Thinking Machines post) and no baseline:

    L = -1/|tokens| Σ_t sg(r_t) log π_θ(y_t|·),   E[∇L] = ∇ Σ_t KL(π_θ(·|x,y_<t) || π_T(·|x,y_<t))

--loss jsd (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models",
https://arxiv.org/abs/2306.13649): the generalized Jensen-Shannon divergence between the teacher's
and the student's full next-token distributions at every position of the sampled sequence,

    JSD_β(P_T || P_θ) = β KL(P_T || M) + (1-β) KL(P_θ || M),   M = β P_T + (1-β) P_θ,

which tends to β KL(P_T || P_θ) as β → 0 and to (1-β) KL(P_θ || P_T) as β → 1; as TRL's GKDTrainer
does, β = 0 is taken as the forward KL(P_T || P_θ) and β = 1 as the reverse KL(P_θ || P_T)
themselves.

--lmbda is the share of steps trained on the dataset's own completions instead of samples
(off-policy, supervised distillation; the jsd loss is used on those steps, since the sampled-token
reward needs samples of π_θ). The teacher must share the student's tokenizer; one that does not is
refused (TRL #3028, https://github.com/huggingface/trl/issues/3028).

The student's samples can come from a vLLM engine (--use_vllm), whose distribution π_sampler is not
exactly the student's: the reverse_kl loss, an expectation over y ~ π_θ, then weights each sampled
token's term by min(π_θ / π_sampler, C) (the sampler correction of grpo.py, common.sampler_weights;
on by default for every sampler, 1 to rounding in fp32). The jsd loss takes no weight: GKD's
divergence is computed over the whole next-token distributions at each position and is defined on
any sequences (its off-policy steps are the dataset's own).

    python opd.py --teacher out/grpo                # student: the embedded SmolLM2-135M-Instruct
    torchrun --nproc_per_node=2 opd.py ...          # DDP, same code path
    torchrun --nproc_per_node=2 opd.py ... --fsdp   # FSDP2: weights, gradients, AdamW state sharded
"""
import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch

import common
import tasks
from plumbing import data, engine, formats, models, runs
from plumbing.args import Sampling, Shared, arg, at_least, between, check_args, default, parse_args
from plumbing.errors import Diverged, UserError


@dataclass
class Args(Sampling, Shared):
    # ---- OPD -------------------------------------------------------------------------------------
    teacher: Optional[str] = arg(None, "the frozen teacher: any causal LM with the student's "
                                 "tokenizer (required)")
    loss: str = arg("reverse_kl", "reverse_kl (per-token reward on the student's samples) or jsd "
                    "(generalized JSD over full distributions, GKD)")
    beta: float = arg(0.5, "β of --loss jsd: 0 forward KL(teacher || student), 1 reverse "
                      "KL(student || teacher)")
    lmbda: float = arg(0.0, "share of steps on the dataset's completions instead of student "
                       "samples (off-policy; the rows need a `completion` or `messages`)")
    temperature: float = arg(1.0, "sampling temperature; student and teacher log-probs use logits "
                             "/ temperature")
    # ---- sampling, evaluation and completions ----------------------------------------------------
    max_new_tokens: int = arg(96, "length limit of a completion")
    max_prompt_length: int = arg(512, "prompts with more tokens than this are dropped (and "
                                 "counted)")
    generation_batch_size: int = arg(64, "completions sampled together in one generate call (KV "
                                     "cache)")
    grader: str = arg("exact", "how answers are graded: exact (numbers exactly) or math_verify "
                      "(also equal as mathematics, by the math-verify library: pip install "
                      "math-verify)")
    log_completions_every: int = arg(10, "write the sampled completions of every this many steps "
                                     "to <output_dir>/completions.jsonl (prompt, completion, its "
                                     "mean log π_student - log π_teacher); 0: off")
    num_completions_to_print: int = arg(1, "of those, how many to print in the log")
    # ---- the shared arguments (plumbing/args.py) with this script's defaults ---------------------
    output_dir: str = default("out/opd")
    batch_size: int = arg(32, "prompts per step over all ranks, one completion each")
    micro_batch_size: int = arg(16, "completions per forward/backward pass")

    def __post_init__(self):
        if self.loss not in ("reverse_kl", "jsd"):
            raise UserError(f"--loss {self.loss}: choose reverse_kl or jsd")
        check_args(self, micro_batch_size=at_least(1), beta=between(0, 1), lmbda=between(0, 1))
        if not self.teacher:
            raise UserError("--teacher is required: a causal LM with the student's tokenizer (e.g. "
                            "out/grpo)")


# --------------------------------------------------------------------------------------------------
# The divergences. Pure functions of tensors.
def reverse_kl_pg_loss(student_logp, teacher_logp, mask, num_tokens, weights=None):
    """The RL view: per-token reward r_t = -(log π_θ(y_t) - log π_T(y_t)) on sampled tokens,
    REINFORCE with discount 0. student_logp, teacher_logp, mask: (N, T). Returns this micro-batch's
    share of the token mean over num_tokens (the whole batch's); its value is Σ sg(log π_θ - log
    π_T) log π_θ, its gradient the reverse KL's. weights: the sampler correction
    (common.sampler_weights of π_θ against π_sampler, (N, T) or (N, 1)) for samples not drawn by
    π_θ itself."""
    reward = -(student_logp - teacher_logp).detach()
    if weights is not None:
        reward = reward * weights
    return -(reward * student_logp * mask).sum() / num_tokens


def generalized_jsd(student_logits, teacher_logits, beta, temperature=1.0):
    """GKD's generalized JSD per position: (..., V) logits -> (...) divergences, in fp32.
    β = 0: KL(P_T || P_θ) (forward); β = 1: KL(P_θ || P_T) (reverse); otherwise
    β KL(P_T || M) + (1-β) KL(P_θ || M) with M = β P_T + (1-β) P_θ."""
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    t = torch.log_softmax(teacher_logits.float() / temperature, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)  # log M
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


# --------------------------------------------------------------------------------------------------
def completion_logits(model, P, P_mask, Y, Y_mask, rt):
    """(N, T, V) logits that predict each completion token (prompts left-padded, completions
    right-padded)."""
    x, mask = torch.cat([P, Y], 1), torch.cat([P_mask, Y_mask], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with rt.autocast():
        out = model(input_ids=x, attention_mask=mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=Y.shape[1] + 1)
        return out.logits[:, :-1]


def dataset_completion(row, tok):
    """The dataset's own answer as completion token ids (its content, then the end-of-turn token,
    where the student's completions stop), for off-policy steps."""
    has_answer = "completion" in row or "messages" in row
    msgs = formats.conversation(row) if has_answer else [{"role": "user"}]
    if msgs[-1]["role"] != "assistant":
        raise UserError("--lmbda > 0 needs rows that end in an assistant answer (`completion` or "
                        "`messages`)")
    return tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"] + [tok.stop_ids[0]]


def rollout(student, tok, sources, rows, prompt_ids, off_policy, args, rt,
            sample=common.generate_ids):
    """A step's completions (token ids) and the log-prob each token was sampled with: sampled by
    the student (batched, with the KV cache; or by `sample`, a vLLM engine), or on an off-policy
    step the dataset's own, cut at --max_new_tokens (and no log-probs: None)."""
    if off_policy:
        ids = [dataset_completion(sources[s].row(i), tok)[: args.max_new_tokens] for s, i in rows]
        return ids, None
    with common.unsharded(student):  # FSDP: whole weights on each rank: no collective
        return sample(student, tok, prompt_ids, rt, args.max_new_tokens,
                      args.generation_batch_size, args.temperature, return_logprobs=True)


def distill_backward(ddp, teacher, tok, prompt_ids, ids, sampled_logp, off_policy, args, rt):
    """[algorithm] The backward of one step's loss: the teacher scores every token of the
    completions `ids`, and the divergence (--loss; on an off-policy step jsd) and its gradient are
    computed micro-batch by micro-batch as a mean over the tokens of the whole batch (all ranks).
    On sampled steps the reverse_kl term of each token is weighted by the sampler correction, w =
    π_θ / π_sampler (common.sampler_weights; sampled_logp: what the sampler drew each token with).
    Returns {"loss"}, each completion's Σ (log π_θ - log π_T), the global token count, and the
    sampler metrics ({} on an off-policy step)."""
    dev = rt.device
    P, P_mask = (t.to(dev) for t in common.pad(prompt_ids, tok.pad_token_id, side="left"))
    # the mask covers each completion up to its EOS, inclusive
    Y, Y_mask = (t.to(dev) for t in common.pad(ids, tok.pad_token_id))
    mask = Y_mask.float()
    S = None if off_policy else common.pad(sampled_logp, 0.0)[0].to(dev)
    correct = (args.loss == "reverse_kl" and not off_policy
               and args.vllm_importance_sampling_correction)
    num_tokens = common.all_reduce(mask.sum(), rt).clamp(min=1)
    micro = [slice(i, i + args.micro_batch_size)
             for i in range(0, len(ids), args.micro_batch_size)]
    sums, kls, olds, weights = {"loss": 0.0}, [], [], []
    for k, mb in enumerate(micro):
        seqs = P[mb], P_mask[mb], Y[mb], Y_mask[mb]
        with common.no_sync(ddp, k < len(micro) - 1):
            s_logits = completion_logits(ddp, *seqs, rt)  # (n, T, V)
            with torch.no_grad():
                t_logits = completion_logits(teacher, *seqs, rt)
            s_logp = common.gather_logprobs(s_logits, Y[mb], args.temperature)
            t_logp = common.gather_logprobs(t_logits, Y[mb], args.temperature)
            w = (common.sampler_weights(s_logp.detach(), S[mb], mask[mb],
                                        args.vllm_importance_sampling_mode,
                                        args.vllm_importance_sampling_clip_max,
                                        args.vllm_importance_sampling_clip_min)
                 if correct else None)
            if args.loss == "reverse_kl" and not off_policy:
                loss = reverse_kl_pg_loss(s_logp, t_logp, mask[mb], num_tokens, w)
            else:
                jsd = generalized_jsd(s_logits, t_logits, args.beta, args.temperature)
                loss = (jsd * mask[mb]).sum() / num_tokens
            # DDP averages over ranks; num_tokens is the global count
            (loss * rt.world_size).backward()
        sums["loss"] += loss.detach()
        kls.append(((s_logp - t_logp).detach() * mask[mb]).sum(1))
        olds.append(s_logp.detach())
        weights.append(w)
    sampler = {} if off_policy else engine.sampler_metrics(
        torch.cat(olds), S, torch.cat(weights) if correct else None, mask, rt)
    return sums, torch.cat(kls), num_tokens, sampler


def load_models(path, teacher_path, args, rt):
    """The student (trained) and the frozen teacher, whose output layer must have the student's
    size."""
    student = models.load_trained(path, rt, args)
    teacher = models.load_frozen(teacher_path, rt, args.trust_remote_code)
    n_teacher = teacher.get_output_embeddings().weight.shape[0]
    n_student = student.get_output_embeddings().weight.shape[0]
    if n_teacher != n_student:
        raise UserError(f"--teacher {args.teacher} has {n_teacher} output logits, the student "
                        f"{n_student}; they must match")
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    return student, teacher


# --------------------------------------------------------------------------------------------------
# Metrics
def step_metrics(sums, kls, ids, num_tokens, off_policy, rt):
    """One step's metrics, reduced over ranks. sums: {"loss": this rank's share of the loss}; kls:
    (n,) Σ (log π_θ - log π_T) over each of this rank's completions."""
    sums = {**sums, "kl": kls.sum(), "completions": float(len(ids))}
    sums = common.all_reduce_sums(sums, rt)
    tokens = num_tokens.item()
    return {"loss": sums["loss"], "kl/student_teacher": sums["kl"] / tokens,
            "on_policy": int(not off_policy),
            "completions/mean_length": tokens / sums["completions"]}


def log_samples(run, step, sources, rows, ids, kls, off_policy, tok):
    """The step's completions, each with its mean log π_student - log π_teacher, to
    completions.jsonl."""
    records = [{"prompt": sources[s][i][0], "completion": tok.decode(c, skip_special_tokens=True),
                "kl_per_token": k / max(len(c), 1), "on_policy": int(not off_policy)}
               for (s, i), c, k in zip(rows, ids, kls.tolist())]
    run.samples.log(step, records)


# --------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args)
    rt = common.setup(args.seed, args.device, args.precision)
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of the "
                        f"{rt.world_size} ranks")
    ckpt_path = runs.claim_output_dir(args, rt)

    path = models.resolve_model(args.model, rt)
    models.check_lengths(args, path, args.trust_remote_code)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    teacher_path = models.resolve_model(args.teacher, rt, "--teacher")
    # TRL #3028: refuse, never guess
    models.check_same_vocab(tok, teacher_path, "--teacher", args.trust_remote_code)
    sources, graded, order = data.load_prompts(args, tok, rt)
    if args.lmbda > 0:  # a clear error now rather than at the first off-policy step
        dataset_completion(sources[0].row(0), tok)

    student, teacher = load_models(path, teacher_path, args, rt)
    # DDP or FSDP under torchrun; before the optimizer (FSDP shards the weights)
    ddp = common.distribute(student, args, rt)
    opt, sched = runs.optimizer_and_schedule(student, args)
    step = 0
    if args.resume:
        step = runs.restore_state(ckpt_path, student, opt, sched, args, rt)["step"]
    # The sampler: common.generate_ids, or a vLLM engine (--use_vllm) with its interface, whose
    # weights are synced after every update
    sample = engine.VLLMSampler(path, tok, args, rt) if args.use_vllm else common.generate_ids
    if args.use_vllm and step:
        sample.sync(student)  # resumed: the engine loaded the starting weights
    run = runs.Run(args, rt, step, ckpt_path, samples=True)

    @common.unsharded(student)  # FSDP: whole weights on each rank while sampling: no collective
    def evaluate():
        prompts, answers = [p for p, _ in graded], [a for _, a in graded]
        return tasks.evaluate_answers(student, tok, prompts, answers, rt, args.max_new_tokens,
                                      args.generation_batch_size, grader=args.grader)[0]

    if step == 0 and graded:
        run.first({"step": 0, **evaluate()})
    row = {}
    while step < run.last:
        t0 = time.perf_counter()
        # ---- [algorithm] 1. Rollout: the student samples a completion for each prompt (on an
        # off-policy step, a share --lmbda of the steps, the dataset's own completions instead)
        batch = order[step * args.batch_size : (step + 1) * args.batch_size]
        rows = batch[rt.rank :: rt.world_size]
        prompt_ids = [sources[s][i][1] for s, i in rows]
        # The same choice on every rank: a function of the seed and the step.
        off_policy = random.Random(f"{args.seed}/{step}").random() < args.lmbda
        ids, sampled_logp = rollout(student, tok, sources, rows, prompt_ids, off_policy, args, rt,
                                    sample)
        t_gen = time.perf_counter() - t0

        # ---- [algorithm] 2. The teacher scores every token; the divergence and its gradient,
        # micro-batch by micro-batch, as a mean over the tokens of the whole batch
        t1 = time.perf_counter()
        sums, kls, num_tokens, sampler = distill_backward(ddp, teacher, tok, prompt_ids, ids,
                                                          sampled_logp, off_policy, args, rt)

        # ---- [algorithm] 3. Update: one AdamW step on the clipped gradient
        grad_norm = common.clip_grad_norm(student, args.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        runs.report_memory(student, opt, rt)  # once: what a rank holds
        sched.step()
        opt.zero_grad(set_to_none=True)
        if args.use_vllm:
            sample.sync(student)  # the next rollout samples from the updated student
        step += 1
        t_train = time.perf_counter() - t1

        # ---- [plumbing] 4. Metrics, held-out evaluation, completions.jsonl, checkpoint
        metrics = {**step_metrics(sums, kls, ids, num_tokens, off_policy, rt), **sampler}
        row = {"step": step, **metrics, "grad_norm": grad_norm, "learning_rate": lr,
               "time/generate_s": t_gen, "time/train_s": t_train,
               "seconds_per_step": time.perf_counter() - t0}
        if not math.isfinite(row["loss"]):
            raise Diverged(f"the loss became {row['loss']} at step {step}")
        if graded and run.eval_due(step):
            row.update(evaluate())
        run.logged(row, kl=row["kl/student_teacher"], len=row["completions/mean_length"],
                   gen_s=t_gen, train_s=t_train)
        if args.log_completions_every and step % args.log_completions_every == 0:
            log_samples(run, step, sources, rows, ids, kls, off_policy, tok)
        run.checkpoint(step, student, opt, sched, tok)
    run.end(step, student, tok, row, name="student")


if __name__ == "__main__":
    runs.run(main)
