"""Bradley-Terry reward model: a scalar head on a language model, trained on preference pairs.

The model of preferences (Bradley and Terry 1952, as in Christiano et al. 2017, arXiv:1706.03741, Eq. 1) is
Pr(y_w ≻ y_l | x) = σ(r_φ(x, y_w) - r_φ(x, y_l)), and the reward model minimises its negative log-likelihood
(Ouyang et al. 2022, InstructGPT, arXiv:2203.02155, Eq. 1):

    L_RM = -E[ log σ( r_φ(x, y_w) - r_φ(x, y_l) - m ) ]  +  c · E[ (r_φ(x, y_w) + r_φ(x, y_l))² ]

m is an optional per-pair margin (a `margin` column, as in Llama 2's reward model) and c the optional centering
coefficient (--center_rewards_coefficient, Eisenstein et al. 2023), which pins the otherwise unidentified offset
of the rewards near zero; only reward differences are learned.

r_φ(x, y) is read at the last real token of prompt + response (the attention mask says where, whatever the
padding side). The model is an AutoModelForSequenceClassification with one label, so the result loads anywhere
with from_pretrained; common.score_responses is the batched scorer that ppo.py and grpo.py call.

    python reward_model.py                            # embedded SmolLM2-135M-Instruct, built-in arithmetic pairs
    python reward_model.py --model out/sft --dataset Anthropic/hh-rlhf --dataset_config harmless-base --max_length 512
    torchrun --nproc_per_node=2 reward_model.py ...  # DDP, same code path
    torchrun --nproc_per_node=2 reward_model.py ... --fsdp# FSDP2: weights, gradients, AdamW state sharded
"""
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from plumbing import data, formats, models, runs
from plumbing.args import arg, at_least, check_args, parse_args
from plumbing.errors import Diverged, UserError


@dataclass
class Args:
    model: str = arg(models.DEFAULT_MODEL, "base model: Hub id, local folder (e.g. sft.py's --output_dir) or .gguf")
    dataset: str = arg("arithmetic_preferences", "built-in task, local .jsonl/.json/.parquet/.csv or Hub id with "
                       "prompt/chosen/rejected or implicit-prompt chosen/rejected (and optional `margin`); "
                       "comma-separated for a mixture")
    dataset_weights: str = arg("", "sampling weights of a mixture, comma-separated (default: equal)")
    dataset_split: str = arg("train", "split of Hub datasets to train on")
    dataset_config: Optional[str] = arg(None, "config (subset) name, or data_dir, of Hub datasets")
    eval_split: Optional[str] = arg(None, "held-out split of the first dataset; default: hold out --eval_size pairs")
    eval_size: int = arg(64, "held-out pairs for the eval_ metrics")
    eval_every: int = arg(10, "evaluate every this many steps (and at start and end)")
    output_dir: str = arg("out/reward_model", "where the final model, args.json, metrics.jsonl and checkpoint.pt go")
    overwrite_output_dir: bool = arg(False, "replace the run an --output_dir already holds (without it: refused)")
    center_rewards_coefficient: float = arg(0.0, "c: weight of the mean squared summed reward (e.g. 0.01)")
    max_steps: int = arg(40, "optimizer steps")
    batch_size: int = arg(16, "preference pairs per optimizer step, over all micro-batches and ranks")
    micro_batch_size: int = arg(0, "pairs per forward/backward pass on each rank, 2x that many sequences (0: a "
                                "rank's share of the batch, at most 8)")
    learning_rate: float = arg(3e-5, "peak learning rate (AdamW)")
    warmup_steps: int = arg(5, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = arg(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW β1")
    adam_beta2: float = arg(0.95, "AdamW β2 (0.95 as nanoGPT; TRL's default is 0.999)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    max_length: int = arg(1024, "tokens of prompt + response; longer pairs are dropped, not cut")
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
    stop_after_steps: int = arg(0, "stop with a checkpoint after this many steps of this invocation; --resume later")
    resume: bool = arg(False, "continue from <output_dir>/checkpoint.pt")
    seed: int = arg(0, "random seed (data order, the new head's initialisation)")
    device: str = arg("auto", "auto, cpu, cuda or mps")
    precision: str = arg("auto", "auto (bf16 where the hardware is fast at it), bf16 or fp32; weights stay fp32")
    trust_remote_code: bool = arg(False, "allow models and tokenizers that run code from their repository")
    chat_template: Optional[str] = arg(None, "Jinja chat template file, for tokenizers without one")

    def __post_init__(self):
        check_args(self, center_rewards_coefficient=at_least(0))


# ----------------------------------------------------------------------------------------------------------------
def bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef=0.0):
    """Ouyang et al. 2022 Eq. 1 with an optional margin and centering term. (B,) rewards -> (B,) per-pair losses."""
    logits = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    return -F.logsigmoid(logits) + center_coef * (r_chosen + r_rejected) ** 2


class Scorer(torch.nn.Module):
    """Wraps the model so that DDP sees the forward that reads the score at the last real token."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, prefix=None):
        return common.sequence_scores(self.model, input_ids, attention_mask, prefix)


def pair_rewards(scorer, pairs, rt, pad_id):
    """Chosen and rejected of `pairs` in one pass -> (B,) chosen rewards, (B,) rejected rewards. The tokens a pair's
    two sequences start with (prompt, assistant header) go through the model once, their KV cache feeding both
    (not under gradient checkpointing, which keeps no cache: then the 2B whole sequences go through at once)."""
    chosen, rejected = [c[0] for c, _ in pairs], [r[0] for _, r in pairs]
    # n: the common prefix of a pair, leaving each sequence at least its last token, where the score is read.
    n = [min(next((j for j, (a, b) in enumerate(zip(c, r)) if a != b), len(c)), len(c) - 1, len(r) - 1)
         for c, r in zip(chosen, rejected)]
    dev, prefix = rt.device, None
    if common.can_share_prefix(scorer) and min(n) > 0:
        p, p_mask = common.pad([c[:k] for c, k in zip(chosen, n)], pad_id, side="left")
        prefix = (p.to(dev), p_mask.to(dev), torch.arange(len(pairs), device=dev).repeat(2))  # row i: pair i mod B
        chosen, rejected = [c[k:] for c, k in zip(chosen, n)], [r[k:] for r, k in zip(rejected, n)]
    x, mask = common.pad(chosen + rejected, pad_id)
    with rt.autocast():
        scores = scorer(x.to(dev), mask.to(dev), prefix)  # (2B,)
    return scores[: len(pairs)], scores[len(pairs) :]


METRICS = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")


def batch_metrics(scorer, batch, args, rt, pad_id):
    """Summed loss and metric sums of one micro-batch of (pair, margin) items."""
    pairs = [p for p, _ in batch]
    margin = torch.tensor([m for _, m in batch], dtype=torch.float32, device=rt.device)
    r_chosen, r_rejected = pair_rewards(scorer, pairs, rt, pad_id)
    losses = bradley_terry_loss(r_chosen, r_rejected, margin, args.center_rewards_coefficient)
    sums = {"loss": losses.sum(), "accuracy": (r_chosen > r_rejected).float().sum(),
            "margin": (r_chosen - r_rejected).sum(), "rewards/chosen": r_chosen.sum(), "rewards/rejected": r_rejected.sum()}
    return losses.sum(), {k: v.detach().float() for k, v in sums.items()}


def margin_of(row, i):
    try:
        m = float(row.get("margin") or 0.0)
    except (TypeError, ValueError):
        m = float("nan")
    if not math.isfinite(m):
        raise UserError(f"row {i}: `margin` {row['margin']!r} is not a number")
    return m


def tokenized_with_margin(rows, tok, args, name, rt):
    """(pair, margin) items of a finite set of rows; pairs are filtered and counted by data.tokenize_preferences."""
    margins = [margin_of(rows[i], i) for i in range(len(rows))]
    kept = formats.tokenize_preferences(rows, tok, args.max_length, name, rt, keep_index=True)
    return [(pair, margins[i]) for i, pair in kept]


def main():
    from transformers import AutoModelForSequenceClassification
    args = parse_args(Args)
    rt = common.setup(args.seed, args.device, args.precision)
    common.split_batch(args, rt, cap=8)
    ckpt_path = runs.claim_output_dir(args, rt)

    # Data
    mixture, raw, heldout = data.load_splits(args, args.eval_size)
    for ds in raw:
        formats.preference_pair(ds[0])  # checks the columns before any work
    path = models.resolve_model(args.model, rt)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    sources = [ds if getattr(ds, "unlimited", False) else tokenized_with_margin(ds, tok, args, name, rt)
               for (name, _), ds in zip(mixture, raw)]
    order = data.mixture_order([len(s) for s in sources], [w for _, w in mixture], args.max_steps * args.batch_size,
                            args.seed, unlimited={i for i, s in enumerate(sources) if not isinstance(s, list)})
    eval_rows = [heldout[i] for i in range(min(args.eval_size, len(heldout)))]
    eval_items = tokenized_with_margin(eval_rows, tok, args, "held-out", rt) if eval_rows else []

    def item(key):
        s, i = key
        if isinstance(sources[s], list):
            return sources[s][i]
        row = sources[s][i]
        x = formats.tokenize_pair(tok, *formats.preference_pair(row), args.max_length)
        if x is None:
            raise UserError(f"a generated pair of {mixture[s][0]} exceeds --max_length {args.max_length}; raise it")
        return x, margin_of(row, i)

    # Model: one scalar head on the language model. A new head starts with std 1/sqrt(d_model + 1)
    # ("N implementation details of RLHF with PPO"), so initial rewards are O(1) whatever the width.
    model, info = models.load_model(path, rt, args.trust_remote_code, cls=AutoModelForSequenceClassification,
                               load_in_4bit=args.load_in_4bit, device="cpu" if args.fsdp else None, num_labels=1,
                               output_loading_info=True)
    head = model.score if hasattr(model, "score") else model.classifier
    if any(k.startswith(("score.", "classifier.")) for k in info["missing_keys"]):
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    model.config.pad_token_id = tok.pad_token_id
    model = models.add_lora(model, args, task_type="SEQ_CLS")  # with --lora_r: adapters, and the whole head trains
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    scorer = Scorer(model)
    ddp = common.distribute(scorer, args, rt)  # DDP or FSDP under torchrun; before the optimizer (FSDP shards the weights)
    opt, sched = runs.optimizer_and_schedule(model, args)
    step = 0
    if args.resume:
        step = runs.restore_state(ckpt_path, model, opt, sched, args, rt)["step"]
    log = runs.begin_log(args, rt, step)

    @torch.no_grad()
    @common.unsharded(scorer)  # FSDP: whole weights on each rank while evaluating, which needs no collective
    def evaluate():
        if not eval_items:
            return {}
        model.eval()
        totals = dict.fromkeys(METRICS, 0.0)  # every rank all-reduces every key, even with no pairs of its own
        mine = eval_items[rt.rank :: rt.world_size]
        for i in range(0, len(mine), args.micro_batch_size):
            _, sums = batch_metrics(scorer, mine[i : i + args.micro_batch_size], args, rt, tok.pad_token_id)
            totals = {k: totals[k] + v for k, v in sums.items()}
        model.train()
        return {f"eval_{k}": (common.all_reduce(v, rt) / len(eval_items)).item() for k, v in totals.items()}

    row = {"step": step}
    if step == 0 and eval_items:
        row.update(evaluate())
        log.log(row)
        rt.print("before training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))

    per_rank = args.batch_size // rt.world_size
    mine = [order[k] for k in range(len(order)) if (k % args.batch_size) % rt.world_size == rt.rank]
    last = min(args.max_steps, step + args.stop_after_steps) if args.stop_after_steps else args.max_steps
    bar = tqdm(total=args.max_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True)
    model.train()
    while step < last:
        # ---- [algorithm] One step of the Bradley-Terry loss over the batch's pairs ---------------------------------
        t0 = time.perf_counter()
        batch = [item(key) for key in mine[step * per_rank : (step + 1) * per_rank]]
        totals = {}
        for k in range(0, per_rank, args.micro_batch_size):
            with common.no_sync(ddp, k + args.micro_batch_size < per_rank):
                loss_sum, sums = batch_metrics(ddp, batch[k : k + args.micro_batch_size], args, rt, tok.pad_token_id)
                # Mean over the pairs of the whole batch; DDP averages over ranks, so scale by world_size.
                (loss_sum * rt.world_size / args.batch_size).backward()
            totals = {n: totals.get(n, 0) + v for n, v in sums.items()}
        row = {n: (common.all_reduce(v, rt) / args.batch_size).item() for n, v in totals.items()}
        if not math.isfinite(row["loss"]):
            raise Diverged(f"the loss became {row['loss']} at step {step + 1}")
        grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        runs.report_memory(model, opt, rt)  # once: what a rank holds
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        # ---- [plumbing] Metrics, held-out evaluation, checkpoint ---------------------------------------------------
        row = {"step": step, **row, "learning_rate": lr, "grad_norm": grad_norm,
               "seconds_per_step": time.perf_counter() - t0}
        if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
            row.update(evaluate())
        log.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.3f}")
        if (args.save_every and step % args.save_every == 0) or step == last:
            runs.save_state(ckpt_path, model, opt, sched, step, args, rt)
            runs.save_checkpoint_model(model, tok, args, step, rt)
    bar.close()

    if step == args.max_steps:
        runs.save_pretrained(model, tok, args.output_dir, rt)
        rt.print("after training: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith("eval")))
        rt.print(f"saved the reward model to {args.output_dir}")
    else:
        rt.print(f"stopped at step {step} of {args.max_steps}; continue with --resume")
    runs.finish(rt)


if __name__ == "__main__":
    runs.run(main)
