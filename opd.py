"""On-policy distillation (OPD): the student samples, a frozen teacher grades every sampled token.

The student π_θ samples completions y ~ π_θ(·|x) for training prompts (batched, with the KV cache), and the teacher
π_T scores the student's own tokens, so the student learns where IT goes wrong, on its own distribution (unlike SFT
on teacher outputs). Two losses:

--loss reverse_kl (default; the RL view: Gu et al. 2024, MiniLLM, arXiv:2306.08543; Lu and Thinking Machines Lab
2025, "On-Policy Distillation"): every sampled token gets the dense reward r_t = -(log π_θ(y_t|·) - log π_T(y_t|·)),
the per-token reverse KL on the sample, and the policy gradient is taken with discount 0 (each token's advantage is its own
reward; later tokens' rewards are not summed in, as in the Thinking Machines post) and no baseline:

    L = -1/|tokens| Σ_t sg(r_t) log π_θ(y_t|·),   E[∇L] = ∇ Σ_t KL(π_θ(·|x,y_<t) || π_T(·|x,y_<t))

--loss jsd (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models", arXiv:2306.13649): the generalized
Jensen-Shannon divergence between the teacher's and the student's full next-token distributions at every
position of the sampled sequence,

    JSD_β(P_T || P_θ) = β KL(P_T || M) + (1-β) KL(P_θ || M),   M = β P_T + (1-β) P_θ,

which tends to β KL(P_T || P_θ) as β → 0 and to (1-β) KL(P_θ || P_T) as β → 1; as TRL's GKDTrainer does,
β = 0 is taken as the forward KL(P_T || P_θ) and β = 1 as the reverse KL(P_θ || P_T) themselves.

--lmbda is the share of steps trained on the dataset's own completions instead of samples (off-policy, supervised
distillation; the jsd loss is used on those steps, since the sampled-token reward needs samples of π_θ).
The teacher must share the student's tokenizer; one that does not is refused (TRL #3028).

    python opd.py --teacher out/grpo                # student: the embedded SmolLM2-135M-Instruct; built-in task
    torchrun --nproc_per_node=2 opd.py ...          # DDP, same code path
    torchrun --nproc_per_node=2 opd.py ... --fsdp   # FSDP2: weights, gradients, AdamW state sharded
"""
import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

import common
import tasks
from plumbing import data, formats, models, runs
from plumbing.args import arg, at_least, between, check_args, parse_args
from plumbing.errors import Diverged, UserError


@dataclass
class Args:
    model: str = arg(models.DEFAULT_MODEL, "the student: Hub id, local folder or .gguf file")
    teacher: Optional[str] = arg(None, "the frozen teacher: any causal LM with the student's tokenizer (required)")
    loss: str = arg("reverse_kl", "reverse_kl (per-token reward on the student's samples) or jsd (generalized JSD "
                    "over full distributions, GKD)")
    beta: float = arg(0.5, "β of --loss jsd: 0 forward KL(teacher || student), 1 reverse KL(student || teacher)")
    lmbda: float = arg(0.0, "share of steps on the dataset's completions instead of student samples (off-policy)")
    dataset: str = arg("arithmetic", "prompts: built-in task name, local .jsonl/.json/.parquet/.csv, or Hub id; "
                       "comma-separated for a mixture; --lmbda > 0 needs `completion` (or `messages`) too")
    dataset_weights: str = arg("", "sampling weights of a mixture, comma-separated (default: equal)")
    dataset_split: str = arg("train", "split of Hub datasets to train on")
    dataset_config: Optional[str] = arg(None, "config (subset) name of Hub datasets")
    eval_split: Optional[str] = arg(None, "held-out split of the first dataset; default: hold out --eval_size rows")
    eval_size: int = arg(64, "held-out prompts answered greedily and graded (needs an `answer`); 0: off")
    grader: str = arg("exact", "how answers are graded: exact (numbers exactly) or math_verify (also equal as "
                      "mathematics, by the math-verify library: pip install math-verify)")
    eval_every: int = arg(5, "measure held-out accuracy every this many steps (and at start and end; 0: only those)")
    output_dir: str = arg("out/opd", "where the final student, args.json, metrics.jsonl and checkpoint.pt go")
    overwrite_output_dir: bool = arg(False, "replace the run an --output_dir already holds (without it: refused)")
    max_steps: int = arg(20, "optimizer steps, one batch each")
    batch_size: int = arg(32, "prompts per step over all ranks, one completion each")
    micro_batch_size: int = arg(16, "completions per forward/backward pass")
    generation_batch_size: int = arg(64, "completions sampled together in one generate call (KV cache)")
    max_new_tokens: int = arg(96, "length limit of a completion")
    max_prompt_length: int = arg(512, "prompts with more tokens than this are dropped (and counted)")
    temperature: float = arg(1.0, "sampling temperature; student and teacher log-probs use logits / temperature")
    learning_rate: float = arg(1e-5, "peak learning rate (AdamW)")
    warmup_steps: int = arg(0, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = arg(1.0, "final learning rate as a fraction of the peak (1: constant)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW β1")
    adam_beta2: float = arg(0.95, "AdamW β2 (0.95 as nanoGPT; TRL's default is 0.999)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
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
                                     "<output_dir>/completions.jsonl (prompt, completion, its mean log π_student - log π_teacher); 0: off")
    num_completions_to_print: int = arg(1, "of those, how many to print in the log")
    stop_after_steps: int = arg(0, "stop with a checkpoint after this many steps; continue later with --resume")
    resume: bool = arg(False, "continue from <output_dir>/checkpoint.pt")
    seed: int = arg(0, "random seed (prompt order, sampling, on/off-policy choice)")
    device: str = arg("auto", "auto, cpu, cuda or mps")
    precision: str = arg("auto", "auto (bf16 where the hardware is fast at it), bf16 or fp32; weights stay fp32")
    trust_remote_code: bool = arg(False, "allow models and tokenizers that run code from their repository")
    chat_template: Optional[str] = arg(None, "Jinja chat template file, for tokenizers without one")

    def __post_init__(self):
        if self.loss not in ("reverse_kl", "jsd"):
            raise UserError(f"--loss {self.loss}: choose reverse_kl or jsd")
        check_args(self, micro_batch_size=at_least(1), beta=between(0, 1), lmbda=between(0, 1))
        if not self.teacher:
            raise UserError("--teacher is required: a causal LM with the student's tokenizer (e.g. out/grpo)")


# ----------------------------------------------------------------------------------------------------------------
# The divergences. Pure functions of tensors.
def reverse_kl_pg_loss(student_logp, teacher_logp, mask, num_tokens):
    """The RL view: per-token reward r_t = -(log π_θ(y_t) - log π_T(y_t)) on sampled tokens, REINFORCE with
    discount 0. student_logp, teacher_logp, mask: (N, T). Returns this micro-batch's share of the token mean over
    num_tokens (the whole batch's); its value is Σ sg(log π_θ - log π_T) log π_θ, its gradient the reverse KL's."""
    reward = -(student_logp - teacher_logp).detach()
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


# ----------------------------------------------------------------------------------------------------------------
def completion_logits(model, P, P_mask, Y, Y_mask, rt):
    """(N, T, V) logits that predict each completion token (prompts left-padded, completions right-padded)."""
    x, mask = torch.cat([P, Y], 1), torch.cat([P_mask, Y_mask], 1)
    with rt.autocast():
        return model(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                     logits_to_keep=Y.shape[1] + 1).logits[:, :-1]


def dataset_completion(row, tok):
    """The dataset's own answer as completion token ids (its content, then EOS), for off-policy steps."""
    msgs = formats.conversation(row) if "completion" in row or "messages" in row else [{"role": "user"}]
    if msgs[-1]["role"] != "assistant":
        raise UserError("--lmbda > 0 needs rows that end in an assistant answer (`completion` or `messages`)")
    return tok(msgs[-1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def main():
    args = parse_args(Args)
    rt = common.setup(args.seed, args.device, args.precision)
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch_size {args.batch_size} must be a multiple of the {rt.world_size} ranks")
    ckpt_path = runs.claim_output_dir(args, rt)

    path = models.resolve_model(args.model, rt)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    teacher_path = models.resolve_model(args.teacher, rt)
    models.check_same_vocab(tok, teacher_path, "--teacher", args.trust_remote_code)  # TRL #3028: refuse, never guess
    sources, graded, order = data.load_prompts(args, tok, rt)
    if args.lmbda > 0:
        dataset_completion(sources[0].row(0), tok)  # a clear error now rather than at the first off-policy step

    student = models.load_trained(path, rt, args)
    teacher = models.load_frozen(teacher_path, rt, args.trust_remote_code)
    if teacher.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]:
        raise UserError(f"--teacher {args.teacher} has {teacher.get_output_embeddings().weight.shape[0]} output "
                        f"logits, the student {student.get_output_embeddings().weight.shape[0]}; they must match")
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    ddp = common.distribute(student, args, rt)  # DDP or FSDP under torchrun; before the optimizer (FSDP shards the weights)
    opt, sched = runs.optimizer_and_schedule(student, args)
    step = 0
    if args.resume:
        step = runs.restore_state(ckpt_path, student, opt, sched, args, rt)["step"]
    log = runs.begin_log(args, rt, step)
    samples = runs.SampleLog(args.output_dir, rt, step, args.num_completions_to_print)

    @common.unsharded(student)  # FSDP: whole weights on each rank while sampling, which needs no collective
    def evaluate():
        return tasks.evaluate_answers(student, tok, [p for p, _ in graded], [a for _, a in graded], rt,
                                  args.max_new_tokens, args.generation_batch_size, grader=args.grader)[0] if graded else {}

    if step == 0 and graded:
        row = {"step": 0, **evaluate()}
        log.log(row)
        rt.print("before training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))

    dev, row = rt.device, {}
    last = min(args.max_steps, step + args.stop_after_steps) if args.stop_after_steps else args.max_steps
    bar = tqdm(total=args.max_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True)
    while step < last:
        # ---- [algorithm] The student samples; the teacher scores every sampled token -------------------------------
        t0 = time.perf_counter()
        rows = order[step * args.batch_size : (step + 1) * args.batch_size][rt.rank :: rt.world_size]
        prompt_ids = [sources[s][i][1] for s, i in rows]
        # The same choice on every rank: a function of the seed and the step.
        off_policy = random.Random(f"{args.seed}/{step}").random() < args.lmbda
        if off_policy:
            ids = [dataset_completion(sources[s].row(i), tok)[: args.max_new_tokens] for s, i in rows]
        else:
            with common.unsharded(student):  # FSDP: whole weights on each rank while sampling: no collective
                ids = common.generate_ids(student, tok, prompt_ids, rt, args.max_new_tokens, args.generation_batch_size,
                                     args.temperature)
        t_gen = time.perf_counter() - t0

        P, P_mask = (t.to(dev) for t in common.pad(prompt_ids, tok.pad_token_id, side="left"))
        Y, Y_mask = (t.to(dev) for t in common.pad(ids, tok.pad_token_id))  # the mask covers each completion up to its EOS, inclusive
        mask = Y_mask.float()
        num_tokens = common.all_reduce(mask.sum(), rt).clamp(min=1)
        micro = [slice(i, i + args.micro_batch_size) for i in range(0, len(ids), args.micro_batch_size)]
        t1 = time.perf_counter()
        sums, kls = {"loss": 0.0}, []  # the loss; Σ (log π_θ - log π_T) over each completion's tokens
        for k, mb in enumerate(micro):
            with common.no_sync(ddp, k < len(micro) - 1):
                s_logits = completion_logits(ddp, P[mb], P_mask[mb], Y[mb], Y_mask[mb], rt)  # (n, T, V)
                with torch.no_grad():
                    t_logits = completion_logits(teacher, P[mb], P_mask[mb], Y[mb], Y_mask[mb], rt)
                s_logp = common.gather_logprobs(s_logits, Y[mb], args.temperature)
                t_logp = common.gather_logprobs(t_logits, Y[mb], args.temperature)
                if args.loss == "reverse_kl" and not off_policy:
                    loss = reverse_kl_pg_loss(s_logp, t_logp, mask[mb], num_tokens)
                else:
                    loss = (generalized_jsd(s_logits, t_logits, args.beta, args.temperature) * mask[mb]).sum() / num_tokens
                (loss * rt.world_size).backward()  # DDP averages over ranks; num_tokens is the global count
            sums["loss"] += loss.detach()
            kls.append(((s_logp - t_logp).detach() * mask[mb]).sum(1))
        grad_norm = common.clip_grad_norm(student, args.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        runs.report_memory(student, opt, rt)  # once: what a rank holds
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        t_train = time.perf_counter() - t1

        # ---- [plumbing] Metrics, reduced over ranks; held-out evaluation; checkpoint -------------------------------
        kls = torch.cat(kls)
        sums.update(kl=kls.sum(), completions=float(len(ids)))
        sums = common.all_reduce_sums(sums, rt)
        tokens = num_tokens.item()
        row = {"step": step, "loss": sums["loss"], "kl/student_teacher": sums["kl"] / tokens,
               "on_policy": int(not off_policy), "completions/mean_length": tokens / sums["completions"],
               "grad_norm": grad_norm, "learning_rate": lr, "time/generate_s": t_gen, "time/train_s": t_train,
               "seconds_per_step": time.perf_counter() - t0}
        if not math.isfinite(row["loss"]):
            raise Diverged(f"the loss became {row['loss']} at step {step}")
        if graded and ((args.eval_every and step % args.eval_every == 0) or step == args.max_steps):
            row.update(evaluate())
        log.log(row)
        if args.log_completions_every and step % args.log_completions_every == 0:
            samples.log(step, [{"prompt": sources[s][i][0], "completion": tok.decode(c, skip_special_tokens=True),
                                "kl_per_token": k / max(len(c), 1), "on_policy": int(not off_policy)}
                               for (s, i), c, k in zip(rows, ids, kls.tolist())])
        bar.update(1)
        bar.set_postfix(kl=f"{row['kl/student_teacher']:.3f}", len=f"{row['completions/mean_length']:.0f}",
                        gen_s=f"{t_gen:.0f}", train_s=f"{t_train:.0f}")
        if (args.save_every and step % args.save_every == 0) or step == last:
            runs.save_state(ckpt_path, student, opt, sched, step, args, rt)
            runs.save_checkpoint_model(student, tok, args, step, rt)
    bar.close()

    if step == args.max_steps:
        runs.save_pretrained(student, tok, args.output_dir, rt)
        if any(k.startswith("eval") for k in row):
            rt.print("after training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith("eval")))
        rt.print(f"saved the student to {args.output_dir}")
    else:
        rt.print(f"stopped at step {step} of {args.max_steps}; continue with --resume")
    runs.finish(rt)


if __name__ == "__main__":
    runs.run(main)
