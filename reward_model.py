"""Bradley-Terry reward model: a scalar head on a language model, trained on preference pairs.

The model of preferences (Bradley and Terry 1952, https://doi.org/10.2307/2334029, as in Christiano
et al. 2017, Eq. 1, https://arxiv.org/abs/1706.03741) is Pr(y_w ≻ y_l | x) = σ(r_φ(x, y_w) -
r_φ(x, y_l)), and the reward model minimises its negative log-likelihood (Ouyang et al. 2022,
InstructGPT, Eq. 1, https://arxiv.org/abs/2203.02155):

    L_RM = -E[ log σ( r_φ(x, y_w) - r_φ(x, y_l) - m ) ]  +  c · E[ (r_φ(x, y_w) + r_φ(x, y_l))² ]

m is an optional per-pair margin (a `margin` column, as in Llama 2's reward model, Touvron et al.
2023, https://arxiv.org/abs/2307.09288) and c the optional centering coefficient
(--center_rewards_coefficient, Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244), which pins
the otherwise unidentified offset of the rewards near zero; only reward differences are learned.

r_φ(x, y) is read at the last real token of prompt + response (the attention mask says where,
whatever the padding side). The model is an AutoModelForSequenceClassification with one label, so
the result loads anywhere with from_pretrained; common.score_responses is the batched scorer that
ppo.py and grpo.py call.

    python reward_model.py    # the embedded SmolLM2-135M-Instruct, built-in arithmetic pairs
    python reward_model.py --model out/sft --dataset Anthropic/hh-rlhf \\
        --dataset_config harmless-base --max_length 512
    torchrun --nproc_per_node=2 reward_model.py ...         # DDP, same code path
    torchrun --nproc_per_node=2 reward_model.py ... --fsdp  # FSDP2: all training state sharded
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import common
from plumbing import data, formats, models, runs
from plumbing.args import Shared, arg, at_least, check_args, default, parse_args
from plumbing.errors import Diverged, UserError


@dataclass
class Args(Shared):
    # ---- Bradley-Terry reward model --------------------------------------------------------------
    center_rewards_coefficient: float = arg(0.0, "c: weight of the mean squared summed reward "
                                            "(e.g. 0.01)")
    max_length: int = arg(1024, "tokens of prompt + response; longer pairs are dropped, not cut")
    # ---- the shared arguments (plumbing/args.py) with this script's defaults ---------------------
    dataset: str = arg("arithmetic_preferences", "built-in task, local .jsonl/.json/.parquet/.csv "
                       "or Hub id with prompt/chosen/rejected or implicit-prompt chosen/rejected "
                       "(and optional `margin`); comma-separated for a mixture")
    eval_every: int = default(10)
    output_dir: str = default("out/reward_model")
    max_steps: int = default(40)
    learning_rate: float = default(3e-5)
    warmup_steps: int = default(5)
    min_lr_ratio: float = default(0.1)
    save_every: int = default(100)

    def __post_init__(self):
        check_args(self, center_rewards_coefficient=at_least(0))


# --------------------------------------------------------------------------------------------------
# The algorithm: the loss and the rewards it compares
def bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef=0.0):
    """Ouyang et al. 2022 Eq. 1 (https://arxiv.org/abs/2203.02155) with an optional margin and
    centering term. (B,) rewards -> (B,) per-pair losses."""
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
    """Chosen and rejected of `pairs` in one pass -> (B,) chosen rewards, (B,) rejected rewards. The
    tokens a pair's two sequences start with (prompt, assistant header) go through the model once,
    their KV cache feeding both (not under gradient checkpointing, which keeps no cache: then the 2B
    whole sequences go through at once)."""
    chosen, rejected = [c[0] for c, _ in pairs], [r[0] for _, r in pairs]
    # n: the common prefix of a pair, leaving each sequence at least its last token, where the score
    # is read.
    n = [min(next((j for j, (a, b) in enumerate(zip(c, r)) if a != b), len(c)), len(c) - 1,
             len(r) - 1)
         for c, r in zip(chosen, rejected)]
    dev, prefix = rt.device, None
    if common.can_share_prefix(scorer) and min(n) > 0:
        p, p_mask = common.pad([c[:k] for c, k in zip(chosen, n)], pad_id, side="left")
        index = torch.arange(len(pairs), device=dev).repeat(2)  # row i: pair i mod B
        prefix = (p.to(dev), p_mask.to(dev), index)
        chosen = [c[k:] for c, k in zip(chosen, n)]
        rejected = [r[k:] for r, k in zip(rejected, n)]
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
            "margin": (r_chosen - r_rejected).sum(), "rewards/chosen": r_chosen.sum(),
            "rewards/rejected": r_rejected.sum()}
    return losses.sum(), {k: v.detach().float() for k, v in sums.items()}


# --------------------------------------------------------------------------------------------------
# Data: (pair, margin) items
def margin_of(row, i):
    try:
        m = float(row.get("margin") or 0.0)
    except (TypeError, ValueError):
        m = float("nan")
    if not math.isfinite(m):
        raise UserError(f"row {i}: `margin` {row['margin']!r} is not a number")
    return m


def tokenized_with_margin(rows, tok, args, name, rt):
    """(pair, margin) items of a finite set of rows; pairs are filtered and counted by
    formats.tokenize_preferences."""
    margins = [margin_of(rows[i], i) for i in range(len(rows))]
    kept = formats.tokenize_preferences(rows, tok, args.max_length, name, rt, keep_index=True)
    return [(pair, margins[i]) for i, pair in kept]


def training_pairs(mixture, raw, tok, args, rt):
    """The sources (a finite one as its (pair, margin) items, tokenized up front; a generated one
    as it is, read by read_pair) and the mixture's order of (source, row) over the whole run:
    --max_steps x --batch_size pairs."""
    sources = [ds if getattr(ds, "unlimited", False)
               else tokenized_with_margin(ds, tok, args, name, rt)
               for (name, _), ds in zip(mixture, raw)]
    unlimited = {i for i, s in enumerate(sources) if not isinstance(s, list)}
    order = data.mixture_order([len(s) for s in sources], [w for _, w in mixture],
                               args.max_steps * args.batch_size, args.seed, unlimited=unlimited)
    return sources, order


def read_pair(sources, key, mixture, tok, args):
    """The (pair, margin) item of key = (source, row): as tokenized up front, or for a generated
    source tokenized now."""
    s, i = key
    if isinstance(sources[s], list):
        return sources[s][i]
    row = sources[s][i]
    with formats.at_row(i, mixture[s][0]):
        x = formats.tokenize_pair(tok, *formats.preference_pair(row), args.max_length)
    if x is None:
        raise UserError(f"a generated pair of {mixture[s][0]} exceeds --max_length "
                        f"{args.max_length}; raise it")
    return x, margin_of(row, i)


# --------------------------------------------------------------------------------------------------
# The model and its evaluation
def init_reward_model(path, tok, args, rt):
    """One scalar head on the language model (AutoModelForSequenceClassification, one label). A new
    head starts with std 1/sqrt(d_model + 1) (Huang et al. 2023, "The N implementation details of
    RLHF with PPO", https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo), so
    initial rewards are O(1) whatever the width."""
    model = models.load_scalar_model(path, rt, args)
    model.config.pad_token_id = tok.pad_token_id
    # with --lora_r: adapters, and the whole head trains
    model = models.add_lora(model, args, task_type="SEQ_CLS")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


@torch.no_grad()
def evaluate(scorer, items, args, rt, pad_id):
    """The eval_ metrics: METRICS over the held-out (pair, margin) items, each rank scoring its
    share. Under FSDP whole weights are on each rank meanwhile, which needs no collective."""
    if not items:
        return {}
    with common.unsharded(scorer):
        scorer.model.eval()
        # every rank all-reduces every key, even with no pairs of its own
        totals = dict.fromkeys(METRICS, 0.0)
        mine = items[rt.rank :: rt.world_size]
        for i in range(0, len(mine), args.micro_batch_size):
            _, sums = batch_metrics(scorer, mine[i : i + args.micro_batch_size], args, rt, pad_id)
            totals = {k: totals[k] + v for k, v in sums.items()}
        scorer.model.train()
        return {f"eval_{k}": (common.all_reduce(v, rt) / len(items)).item()
                for k, v in totals.items()}


# --------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args)
    rt = common.setup(args.seed, args.device, args.precision)
    runs.split_batch(args, rt, cap=8)
    ckpt_path = runs.claim_output_dir(args, rt)

    # Data: the training pairs and their mixture order, the held-out pairs
    mixture, raw, heldout = data.load_splits(args, args.eval_size)
    for ds in raw:
        formats.preference_pair(ds[0])  # checks the columns before any work
    path = models.resolve_model(args.model, rt)
    models.check_lengths(args, path, args.trust_remote_code)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    sources, order = training_pairs(mixture, raw, tok, args, rt)
    eval_rows = [heldout[i] for i in range(min(args.eval_size, len(heldout)))]
    eval_items = tokenized_with_margin(eval_rows, tok, args, "held-out", rt) if eval_rows else []

    # Model, optimizer, schedule
    model = init_reward_model(path, tok, args, rt)
    scorer = Scorer(model)
    ddp = common.distribute(scorer, args, rt)  # DDP or FSDP under torchrun; before the optimizer
    opt, sched = runs.optimizer_and_schedule(model, args)
    step = 0
    if args.resume:
        step = runs.restore_state(ckpt_path, model, opt, sched, args, rt)["step"]
    run = runs.Run(args, rt, step, ckpt_path)

    pad_id = tok.pad_token_id
    if step == 0:
        run.first({"step": 0, **evaluate(scorer, eval_items, args, rt, pad_id)})
    per_rank = args.batch_size // rt.world_size
    mine = [key for k, key in enumerate(order) if (k % args.batch_size) % rt.world_size == rt.rank]
    row = {"step": step}
    model.train()
    while step < run.last:
        t0 = time.perf_counter()
        # ---- [algorithm] 1. The batch: this rank's share of the step's pairs
        keys = mine[step * per_rank : (step + 1) * per_rank]
        batch = [read_pair(sources, key, mixture, tok, args) for key in keys]

        # ---- [algorithm] 2. The gradient of L_RM, the mean over the pairs of the whole batch,
        # accumulated over the micro-batches
        totals = {}
        for k in range(0, per_rank, args.micro_batch_size):
            with common.no_sync(ddp, k + args.micro_batch_size < per_rank):
                part = batch[k : k + args.micro_batch_size]
                loss_sum, sums = batch_metrics(ddp, part, args, rt, pad_id)
                # Mean over the pairs of the whole batch; DDP averages over ranks, so scale by
                # world_size.
                (loss_sum * rt.world_size / args.batch_size).backward()
            totals = {n: totals.get(n, 0) + v for n, v in sums.items()}
        metrics = {n: (common.all_reduce(v, rt) / args.batch_size).item()
                   for n, v in totals.items()}
        if not math.isfinite(metrics["loss"]):
            raise Diverged(f"the loss became {metrics['loss']} at step {step + 1}")

        # ---- [algorithm] 3. The update: clipped gradient, AdamW, the schedule
        grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        runs.report_memory(model, opt, rt)  # once: what a rank holds
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # ---- [plumbing] 4. Metrics, held-out evaluation, checkpoint
        row = {"step": step, **metrics, "learning_rate": lr, "grad_norm": grad_norm,
               "seconds_per_step": time.perf_counter() - t0}
        if run.eval_due(step):
            row.update(evaluate(scorer, eval_items, args, rt, pad_id))
        run.logged(row, loss=row["loss"], acc=row["accuracy"], margin=row["margin"])
        run.checkpoint(step, model, opt, sched, tok)
    run.end(step, model, tok, row, name="reward model")


if __name__ == "__main__":
    runs.run(main)
