"""Supervised fine-tuning (SFT): next-token training on demonstrations, with the loss on assistant
tokens only.

The objective, the supervised stage of InstructGPT (Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155, §3.5):

    L_SFT(θ) = -(1 / Σ_t m_t) Σ_t m_t log p_θ(x_{t+1} | x_{1:t}),
    m_t = 1 iff x_{t+1} is an assistant token

System, user and tool turns stay in the context but are never targets; the assistant's end-of-turn
token is a target, so the model learns to stop. With several sources, example i comes from source s
with probability w_s (the mixture risk Σ_s w_s E_{D_s}[L_SFT]).

How this deviates from the equation as written: the normaliser Σ m_t is the number of assistant
tokens in the whole optimizer batch (over gradient-accumulation micro-batches and DDP ranks), not
per example or per micro-batch, so long answers weigh in proportion to their tokens and the loss
does not depend on how a batch is split.

    python sft.py     # the embedded SmolLM2-135M-Instruct on the built-in arithmetic task
    python sft.py --model HuggingFaceTB/SmolLM2-360M-Instruct \\
        --dataset HuggingFaceH4/ultrachat_200k --dataset_split train_sft --max_length 1024
    torchrun --nproc_per_node=2 sft.py ...          # DDP, same code path
    torchrun --nproc_per_node=2 sft.py ... --fsdp   # FSDP2: weights, gradients, AdamW state sharded
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
import tasks
import tools
from plumbing import data, formats, models, runs
from plumbing.args import Shared, arg, check_args, default, parse_args
from plumbing.errors import Diverged, UserError


@dataclass
class Args(Shared):
    # ---- SFT -------------------------------------------------------------------------------------
    max_length: int = arg(1024, "tokens per example; longer ones are cut, and dropped if no "
                          "assistant token is left")
    # ---- held-out answers ------------------------------------------------------------------------
    eval_generations: int = arg(64, "held-out problems answered greedily at start and end to "
                                "measure the share with a \\boxed{} answer and the share correct "
                                "(needs an `answer` column; 0: off)")
    max_new_tokens: int = arg(96, "length limit of those answers")
    grader: str = arg("exact", "how answers are graded: exact (numbers exactly) or math_verify "
                      "(also equal as mathematics, by the math-verify library: pip install "
                      "math-verify)")
    # ---- the shared arguments (plumbing/args.py) with this script's defaults ---------------------
    eval_every: int = arg(50, "compute eval_loss every this many steps (and at the end; 0: only at "
                          "the end)")
    output_dir: str = default("out/sft")
    max_steps: int = default(80)
    learning_rate: float = default(1e-4)
    warmup_steps: int = default(5)
    min_lr_ratio: float = default(0.1)
    save_every: int = default(100)

    def __post_init__(self):
        check_args(self)


# --------------------------------------------------------------------------------------------------
# Data: tokenized sources, the mixture stream and the held-out set
class Tokenized:
    """A dataset tokenized with assistant-only labels. Finite datasets are tokenized up front, and
    examples with no assistant token within max_length are dropped and counted; generated tasks are
    tokenized when read."""

    def __init__(self, name, ds, tok, max_length):
        self.name, self.ds, self.tok, self.max_length = name, ds, tok, max_length
        self.unlimited = getattr(ds, "unlimited", False)
        with formats.at_row(0, name):  # checks the columns: a clear error before any work
            formats.conversation(ds[0])
        rows = range(min(8, len(ds))) if self.unlimited else range(len(ds))
        self.items = [self._tokenize(i) for i in rows]
        self.dropped = sum(x is None for x in self.items)
        if self.dropped == len(self.items):
            turns = (m for i in rows for m in formats.conversation(ds[i]))
            if not any(m["role"] == "assistant" for m in turns):
                raise UserError(f"no example of {name} has an assistant turn: there is nothing to "
                                "train on")
            raise UserError(f"--max_length {max_length} leaves no assistant token in any example "
                            f"of {name}; raise it")
        if not self.unlimited:
            self.items = [x for x in self.items if x is not None]

    def _tokenize(self, i):
        with formats.at_row(i, self.name):
            messages, kw = with_tools(self.ds[i], self.tok)
        return common.tokenize_conversation(self.tok, messages, self.max_length, **kw)

    def __len__(self):
        return len(self.ds) if self.unlimited else len(self.items)

    def __getitem__(self, i):
        if not self.unlimited:
            return self.items[i]
        x = self._tokenize(i)
        self.dropped += x is None
        return x


def with_tools(row, tok):
    """A row's conversation, and the chat template's keywords: with a `tools` column (TRL's: the
    JSON schemas of the tools the conversation may call), the tools described as grpo.py --tools
    describes them (tools.describe), and assistant `tool_calls` written as the policy writes them
    where the template does not render them (tools.calls_as_text)."""
    messages = tools.calls_as_text(tok, formats.conversation(row))
    if row.get("tools"):
        return tools.describe(tok, messages, row["tools"])
    return messages, {}


def training_data(mixture, raw, tok, args, rt):
    """The tokenized sources (their sizes printed) and the mixture's order of (source, row) over
    the whole run: --max_steps x --batch_size examples."""
    sources = [Tokenized(s, ds, tok, args.max_length) for (s, _), ds in zip(mixture, raw)]
    for (s, _), src in zip(mixture, sources):
        if not src.unlimited:
            dropped = (f", {src.dropped} dropped (no assistant token, or none within --max_length "
                       f"{args.max_length})" if src.dropped else "")
            rt.print(f"data: {s}: {len(src)} examples" + dropped)
    unlimited = {i for i, s in enumerate(sources) if s.unlimited}
    order = data.mixture_order([len(s) for s in sources], [w for _, w in mixture],
                               args.max_steps * args.batch_size, args.seed, unlimited=unlimited)
    return sources, order


def held_out(heldout, tok, args):
    """The held-out set: its first --eval_size rows tokenized for eval_loss (those left with no
    assistant token dropped), and of its first --eval_generations rows those with an `answer`, as
    prompts (the conversation without its last turn) and answers."""
    def tokenized(row):
        messages, kw = with_tools(row, tok)
        return common.tokenize_conversation(tok, messages, args.max_length, **kw)

    n = min(args.eval_size, len(heldout))
    examples = [tokenized(heldout[i]) for i in range(n)]
    rows = (heldout[i] for i in range(min(args.eval_generations, len(heldout))))
    answerable = [r for r in rows if "answer" in r]
    return {"examples": [x for x in examples if x is not None],
            "prompts": [with_tools(r, tok)[0][:-1] for r in answerable],
            "answers": [r["answer"] for r in answerable]}


def batches(examples, size, pad_id):
    """Micro-batches of (input_ids, attention_mask, labels), right-padded."""
    for i in range(0, len(examples), size):
        ids, labels = zip(*examples[i : i + size])
        x, mask = common.pad(ids, pad_id)
        y, _ = common.pad(labels, common.IGNORE_INDEX)
        yield x, mask, y


def micro_batches(examples, args, tok, rt):
    """This rank's micro-batches of a step, and the weight of each. Under FSDP each micro-batch is a
    collective step: a rank short of them (generated examples dropped for length) repeats its last
    one with weight 0, so that every rank runs as many."""
    micro = list(batches(examples, args.micro_batch_size, tok.pad_token_id))
    short = int(common.all_reduce(len(micro), rt, op="max").item()) - len(micro)
    return micro + micro[-1:] * short, [1.0] * len(micro) + [0.0] * short


# --------------------------------------------------------------------------------------------------
# The loss
def token_nll(model, x, mask, y, rt):
    """Summed NLL of the trained tokens of one micro-batch (the numerator of L_SFT) and the number
    of its tokens."""
    x, mask, y = x.to(rt.device), mask.to(rt.device), y.to(rt.device)
    # (B, K, V), (B, K): prompt positions skipped
    logits, targets = common.label_logits(model, x, mask, y, rt)
    keep = targets != common.IGNORE_INDEX
    # Only the rows of the logits at trained positions are upcast to fp32 for the loss.
    nll = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return nll, keep.sum()


# --------------------------------------------------------------------------------------------------
# Evaluation
@torch.no_grad()
def eval_loss(model, examples, args, tok, rt):
    model.eval()
    total, count = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device)
    mine = examples[rt.rank :: rt.world_size]
    for x, mask, y in batches(mine, args.micro_batch_size, tok.pad_token_id):
        nll, n = token_nll(model, x, mask, y, rt)
        total, count = total + nll.float(), count + n
    model.train()
    return (common.all_reduce(total, rt) / common.all_reduce(count, rt)).item()


def evaluate(model, held, args, tok, rt, loss=True, answers=True):
    """The held-out metrics (held: held_out): with loss, eval_loss (L_SFT on the held-out examples);
    with answers, the shares of greedy held-out answers with a \\boxed{} (eval/boxed) and correct
    (eval/accuracy). Under FSDP whole weights are on each rank meanwhile: no collective needed."""
    loss, answers = loss and bool(held["examples"]), answers and bool(held["prompts"])
    row = {}
    if not (loss or answers):
        return row
    with common.unsharded(model):
        if loss:
            row["eval_loss"] = eval_loss(model, held["examples"], args, tok, rt)
        if answers:
            row.update(tasks.evaluate_answers(model, tok, held["prompts"], held["answers"], rt,
                                              args.max_new_tokens, grader=args.grader)[0])
    return row


# --------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args)
    rt = common.setup(args.seed, args.device, args.precision)
    runs.split_batch(args, rt, cap=16)
    ckpt_path = runs.claim_output_dir(args, rt)

    # Data. Examples of the built-in task are generated; others are read, held-out rows split off,
    # tokenized.
    mixture, raw, heldout = data.load_splits(args, max(args.eval_size, args.eval_generations))
    path = models.resolve_model(args.model, rt)
    models.check_lengths(args, path, args.trust_remote_code)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template, add_tokens=True)
    sources, order = training_data(mixture, raw, tok, args, rt)
    held = held_out(heldout, tok, args)

    # Model, optimizer, schedule
    model = models.load_trained(path, rt, args, tok)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    ddp = common.distribute(model, args, rt)  # DDP or FSDP under torchrun; before the optimizer
    opt, sched = runs.optimizer_and_schedule(model, args)
    step, num_tokens = 0, 0
    if args.resume:
        state = runs.restore_state(ckpt_path, model, opt, sched, args, rt)
        step, num_tokens = state["step"], state["num_tokens"]
    run = runs.Run(args, rt, step, ckpt_path)

    if step == 0:
        run.first({"step": 0, **evaluate(model, held, args, tok, rt)})
    row = {"step": step}
    model.train()
    while step < run.last:
        t0 = time.perf_counter()
        # ---- [algorithm] 1. The batch: this rank's share of the step's examples
        start = step * args.batch_size
        rows = order[start : start + args.batch_size][rt.rank :: rt.world_size]
        examples = [x for x in (sources[s][i] for s, i in rows) if x is not None]
        # ---- [algorithm] 2. The normaliser of L_SFT: the trained tokens of the whole optimizer
        # batch, over micro-batches and ranks
        n_local = sum(sum(l != common.IGNORE_INDEX for l in labels[1:]) for _, labels in examples)
        n_target = common.all_reduce(float(n_local), rt).item()

        # ---- [algorithm] 3. The gradient of L_SFT, accumulated over the micro-batches
        micro, weights = micro_batches(examples, args, tok, rt)
        nll_sum = 0.0
        for k, ((x, mask, y), w) in enumerate(zip(micro, weights)):
            # Under DDP gradients are all-reduced over ranks once per step, on the last micro-batch.
            with common.no_sync(ddp, k < len(micro) - 1):
                nll, _ = token_nll(ddp, x, mask, y, rt)
                # DDP averages gradients over ranks; scaling by world_size turns that average into
                # the global sum.
                (w * nll * rt.world_size / n_target).backward()
            nll_sum += w * nll.item()
        loss = common.all_reduce(nll_sum, rt).item() / n_target
        if not math.isfinite(loss):
            raise Diverged(f"the loss became {loss} at step {step + 1}")

        # ---- [algorithm] 4. The update: clipped gradient, AdamW, the schedule
        grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        runs.report_memory(model, opt, rt)  # once: what a rank holds
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # ---- [plumbing] 5. Metrics, held-out evaluation, checkpoint
        tokens = common.all_reduce(float(sum(len(ids) for ids, _ in examples)), rt).item()
        num_tokens += int(tokens)
        seconds = time.perf_counter() - t0
        row = {"step": step, "loss": loss, "learning_rate": lr, "grad_norm": grad_norm,
               "num_tokens": num_tokens, "tokens_per_second": tokens / seconds,
               "seconds_per_step": seconds}
        final = step == args.max_steps  # the held-out answers: at the start and the end
        row.update(evaluate(model, held, args, tok, rt, loss=run.eval_due(step), answers=final))
        run.logged(row, loss=loss, lr=lr, tok_s=row["tokens_per_second"])
        run.checkpoint(step, model, opt, sched, tok, num_tokens=num_tokens)

    run.bar.close()  # its line ends before the count of dropped generated examples
    for (name, _), src in zip(mixture, sources):
        if src.unlimited and src.dropped:  # finite sources were counted up front
            rt.print(f"data: {name}: {src.dropped} generated examples dropped (no assistant token "
                     "within --max_length)")
    run.end(step, model, tok, row)


if __name__ == "__main__":
    runs.run(main)
