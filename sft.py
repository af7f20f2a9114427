"""Supervised fine-tuning (SFT): next-token training on demonstrations, with the loss on assistant tokens only.

The objective, the supervised stage of InstructGPT (Ouyang et al. 2022, arXiv:2203.02155, §3.5):

    L_SFT(θ) = -(1 / Σ_t m_t) Σ_t m_t log p_θ(x_{t+1} | x_{1:t}),    m_t = 1 iff x_{t+1} is an assistant token

System, user and tool turns stay in the context but are never targets; the assistant's end-of-turn token is a
target, so the model learns to stop. With several sources, example i comes from source s with probability w_s
(the mixture risk Σ_s w_s E_{D_s}[L_SFT]).

How this deviates from the equation as written: the normaliser Σ m_t is the number of assistant tokens in the whole
optimizer batch (over gradient-accumulation micro-batches and DDP ranks), not per example or per micro-batch, so
long answers weigh in proportion to their tokens and the loss does not depend on how a batch is split.

    python sft.py                                    # embedded SmolLM2-135M-Instruct, built-in arithmetic task
    python sft.py --model HuggingFaceTB/SmolLM2-360M-Instruct --dataset HuggingFaceH4/ultrachat_200k \\
        --dataset_split train_sft --max_length 1024
    torchrun --nproc_per_node=2 sft.py ...          # DDP, same code path
    torchrun --nproc_per_node=2 sft.py ... --fsdp   # FSDP2: weights, gradients, AdamW state sharded
"""
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import tasks
from plumbing import data, formats, models, runs
from plumbing.args import arg, check_args, parse_args
from plumbing.errors import Diverged, UserError


@dataclass
class Args:
    model: str = arg(models.DEFAULT_MODEL, "Hub id, local checkpoint folder (e.g. an earlier stage's --output_dir) or .gguf file")
    dataset: str = arg("arithmetic", "built-in task name, local .jsonl/.json/.parquet/.csv, or Hub id; "
                       "comma-separated for a mixture")
    dataset_weights: str = arg("", "sampling weights of a mixture, comma-separated (default: equal)")
    dataset_split: str = arg("train", "split of Hub datasets to train on")
    dataset_config: Optional[str] = arg(None, "config (subset) name of Hub datasets")
    eval_split: Optional[str] = arg(None, "held-out split of the first dataset; default: hold out --eval_size "
                                    "training rows (the built-in task has its own disjoint held-out problems)")
    eval_size: int = arg(64, "held-out examples for eval_loss")
    grader: str = arg("exact", "how answers are graded: exact (numbers exactly) or math_verify (also equal as "
                      "mathematics, by the math-verify library: pip install math-verify)")
    eval_every: int = arg(50, "compute eval_loss every this many steps (and at the end; 0: only at the end)")
    eval_generations: int = arg(64, "held-out problems answered greedily at start and end to measure the share "
                                "with a \\boxed{} answer and the share correct (needs an `answer` column; 0: off)")
    max_new_tokens: int = arg(96, "length limit of those answers")
    output_dir: str = arg("out/sft", "where the final model, args.json, metrics.jsonl and checkpoint.pt go")
    overwrite_output_dir: bool = arg(False, "replace the run an --output_dir already holds (without it: refused)")
    max_steps: int = arg(80, "optimizer steps")
    batch_size: int = arg(16, "examples per optimizer step, over all micro-batches and ranks")
    micro_batch_size: int = arg(0, "examples per forward/backward pass on each rank (0: a rank's share of the batch, "
                                "at most 16)")
    learning_rate: float = arg(1e-4, "peak learning rate (AdamW)")
    warmup_steps: int = arg(5, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW β1")
    adam_beta2: float = arg(0.95, "AdamW β2 (0.95 as nanoGPT; TRL's default is 0.999)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    max_length: int = arg(1024, "tokens per example; longer ones are cut, and dropped if no assistant token is left")
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
    save_every: int = arg(100, "write checkpoint.pt every this many steps (0: only at the end)")
    save_model_checkpoints: bool = arg(False, "with each --save_every checkpoint, also write a loadable model "
                                       "folder <output_dir>/checkpoint-<step>/")
    report_to: str = arg("none", "also log the metrics to wandb, trackio or tensorboard (comma-separated); none")
    stop_after_steps: int = arg(0, "stop with a checkpoint after this many steps of this invocation (the schedule "
                                "still follows --max_steps); continue later with --resume")
    resume: bool = arg(False, "continue from <output_dir>/checkpoint.pt")
    seed: int = arg(0, "random seed (data order, initialisation of new weights)")
    device: str = arg("auto", "auto, cpu, cuda or mps")
    precision: str = arg("auto", "auto (bf16 where the hardware is fast at it), bf16 or fp32; weights stay fp32")
    trust_remote_code: bool = arg(False, "allow models and tokenizers that run code from their repository")
    chat_template: Optional[str] = arg(None, "Jinja chat template file, for tokenizers without one")

    def __post_init__(self):
        check_args(self)


# ----------------------------------------------------------------------------------------------------------------
# Data: tokenized sources and the mixture stream
class Tokenized:
    """A dataset tokenized with assistant-only labels. Finite datasets are tokenized up front, and examples with no
    assistant token within max_length are dropped and counted; generated tasks are tokenized when read."""

    def __init__(self, name, ds, tok, max_length):
        self.ds, self.tok, self.max_length = ds, tok, max_length
        self.unlimited = getattr(ds, "unlimited", False)
        formats.conversation(ds[0])  # checks the columns: a clear error before any work
        rows = range(min(8, len(ds))) if self.unlimited else range(len(ds))
        self.items = [self._tokenize(i) for i in rows]
        self.dropped = sum(x is None for x in self.items)
        if self.dropped == len(self.items):
            if not any(m["role"] == "assistant" for i in rows for m in formats.conversation(ds[i])):
                raise UserError(f"no example of {name} has an assistant turn: there is nothing to train on")
            raise UserError(f"--max_length {max_length} leaves no assistant token in any example of {name}; raise it")
        if not self.unlimited:
            self.items = [x for x in self.items if x is not None]

    def _tokenize(self, i):
        return common.tokenize_conversation(self.tok, formats.conversation(self.ds[i]), self.max_length)

    def __len__(self):
        return len(self.ds) if self.unlimited else len(self.items)

    def __getitem__(self, i):
        if not self.unlimited:
            return self.items[i]
        x = self._tokenize(i)
        self.dropped += x is None
        return x


def batches(examples, size, pad_id):
    """Micro-batches of (input_ids, attention_mask, labels), right-padded."""
    for i in range(0, len(examples), size):
        ids, labels = zip(*examples[i : i + size])
        x, mask = common.pad(ids, pad_id)
        y, _ = common.pad(labels, common.IGNORE_INDEX)
        yield x, mask, y


def token_nll(model, x, mask, y, rt):
    """Summed NLL of the trained tokens of one micro-batch (the numerator of L_SFT) and the number of its tokens."""
    x, mask, y = x.to(rt.device), mask.to(rt.device), y.to(rt.device)
    logits, targets = common.label_logits(model, x, mask, y, rt)  # (B, K, V), (B, K): prompt positions skipped
    keep = targets != common.IGNORE_INDEX
    # Only the rows of the logits at trained positions are upcast to fp32 for the loss.
    nll = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return nll, keep.sum()


@torch.no_grad()
def eval_loss(model, examples, args, tok, rt):
    model.eval()
    total, count = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device)
    for x, mask, y in batches(examples[rt.rank :: rt.world_size], args.micro_batch_size, tok.pad_token_id):
        nll, n = token_nll(model, x, mask, y, rt)
        total, count = total + nll.float(), count + n
    model.train()
    return (common.all_reduce(total, rt) / common.all_reduce(count, rt)).item()


# ----------------------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args)
    rt = common.setup(args.seed, args.device, args.precision)
    common.split_batch(args, rt, cap=16)
    ckpt_path = runs.claim_output_dir(args, rt)

    # Data. Examples of the built-in task are generated; others are read, held-out rows split off, tokenized.
    mixture, raw, heldout = data.load_splits(args, max(args.eval_size, args.eval_generations))
    path = models.resolve_model(args.model, rt)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    sources = [Tokenized(s, ds, tok, args.max_length) for (s, _), ds in zip(mixture, raw)]
    eval_examples = [x for x in (common.tokenize_conversation(tok, formats.conversation(heldout[i]), args.max_length)
                                 for i in range(min(args.eval_size, len(heldout)))) if x is not None]
    answerable = [heldout[i] for i in range(min(args.eval_generations, len(heldout))) if "answer" in heldout[i]]
    prompts, answers = [formats.conversation(r)[:-1] for r in answerable], [r["answer"] for r in answerable]
    for (s, _), src in zip(mixture, sources):
        if not src.unlimited:
            rt.print(f"data: {s}: {len(src)} examples" + (f", {src.dropped} dropped (no assistant token, or none "
                                                           f"within --max_length {args.max_length})" if src.dropped else ""))
    order = data.mixture_order([len(s) for s in sources], [w for _, w in mixture], args.max_steps * args.batch_size,
                            args.seed, unlimited={i for i, s in enumerate(sources) if s.unlimited})

    # Model, optimizer, schedule
    model = models.load_trained(path, rt, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    ddp = common.distribute(model, args, rt)  # DDP or FSDP under torchrun; before the optimizer (FSDP shards the weights)
    opt, sched = runs.optimizer_and_schedule(model, args)
    step, num_tokens = 0, 0
    if args.resume:
        state = runs.restore_state(ckpt_path, model, opt, sched, args, rt)
        step, num_tokens = state["step"], state["num_tokens"]
    log = runs.begin_log(args, rt, step)

    row = {"step": step}
    if step == 0:
        with common.unsharded(model):  # FSDP: whole weights on each rank while evaluating, which needs no collective
            if eval_examples:
                row["eval_loss"] = eval_loss(model, eval_examples, args, tok, rt)
            if answerable:
                row.update(tasks.evaluate_answers(model, tok, prompts, answers, rt, args.max_new_tokens,
                                              grader=args.grader)[0])
        if len(row) > 1:
            log.log(row)
            rt.print("before training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))

    last = min(args.max_steps, step + args.stop_after_steps) if args.stop_after_steps else args.max_steps
    bar = tqdm(total=args.max_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True)
    model.train()
    while step < last:
        # ---- [algorithm] One step of L_SFT: the mean NLL over the batch's trained tokens ---------------------------
        t0 = time.perf_counter()
        rows = order[step * args.batch_size : (step + 1) * args.batch_size][rt.rank :: rt.world_size]
        examples = [x for x in (sources[s][i] for s, i in rows) if x is not None]
        # The normaliser of L_SFT: trained tokens of the whole optimizer batch, over micro-batches and ranks.
        n_local = sum(sum(l != common.IGNORE_INDEX for l in labels[1:]) for _, labels in examples)
        n_target = common.all_reduce(float(n_local), rt).item()
        nll_sum, tokens = 0.0, sum(len(ids) for ids, _ in examples)
        micro = list(batches(examples, args.micro_batch_size, tok.pad_token_id))
        # Under FSDP each micro-batch is a collective step: a rank short of them (generated examples dropped for
        # length) repeats its last one with weight 0, so that every rank runs as many.
        n_micro = int(common.all_reduce(len(micro), rt, op="max").item())
        weights, micro = [1.0] * len(micro) + [0.0] * (n_micro - len(micro)), micro + micro[-1:] * (n_micro - len(micro))
        for k, ((x, mask, y), w) in enumerate(zip(micro, weights)):
            # Under DDP gradients are all-reduced over ranks once per step, on the last micro-batch.
            with common.no_sync(ddp, k < len(micro) - 1):
                nll, _ = token_nll(ddp, x, mask, y, rt)
                # DDP averages gradients over ranks; scaling by world_size turns that average into the global sum.
                (w * nll * rt.world_size / n_target).backward()
            nll_sum += w * nll.item()
        loss = common.all_reduce(nll_sum, rt).item() / n_target
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss} at step {step + 1}")
        grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        runs.report_memory(model, opt, rt)  # once: what a rank holds
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        # ---- [plumbing] Metrics, held-out evaluation, checkpoint ---------------------------------------------------
        tokens = common.all_reduce(float(tokens), rt).item()
        num_tokens += int(tokens)
        seconds = time.perf_counter() - t0
        tps = tokens / seconds
        row = {"step": step, "loss": loss, "learning_rate": lr, "grad_norm": grad_norm, "num_tokens": num_tokens,
               "tokens_per_second": tps, "seconds_per_step": seconds}
        due = eval_examples and ((args.eval_every and step % args.eval_every == 0) or step == args.max_steps)
        if due or (step == args.max_steps and answerable):
            with common.unsharded(model):
                if due:
                    row["eval_loss"] = eval_loss(model, eval_examples, args, tok, rt)
                if step == args.max_steps and answerable:
                    row.update(tasks.evaluate_answers(model, tok, prompts, answers, rt, args.max_new_tokens,
                                                  grader=args.grader)[0])
        log.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        if (args.save_every and step % args.save_every == 0) or step == last:
            runs.save_state(ckpt_path, model, opt, sched, step, args, rt, num_tokens=num_tokens)
            runs.save_checkpoint_model(model, tok, args, step, rt)
    bar.close()

    for (name, _), src in zip(mixture, sources):
        if src.unlimited and src.dropped:  # finite sources were counted up front
            rt.print(f"data: {name}: {src.dropped} generated examples dropped (no assistant token within --max_length)")
    if step == args.max_steps:
        runs.save_pretrained(model, tok, args.output_dir, rt)
        if any(k.startswith("eval") for k in row):
            rt.print("after training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith("eval")))
        rt.print(f"saved the model to {args.output_dir}")
    else:
        rt.print(f"stopped at step {step} of {args.max_steps}; continue with --resume")
    runs.finish(rt)


if __name__ == "__main__":
    runs.run(main)
