"""Direct preference optimization (DPO) and close variants, trained on preference pairs (prompt,
chosen, rejected).

DPO (Rafailov et al. 2023, Eq. 7, https://arxiv.org/abs/2305.18290) needs no reward model and no
sampling:

    L_DPO = -log σ( β [ (log π_θ(y_w|x) - log π_ref(y_w|x))
                        - (log π_θ(y_l|x) - log π_ref(y_l|x)) ] )

where log π(y|x) sums the log-probs of the response tokens only (the prompt is context, never
scored). The implicit reward of a response is r(x, y) = β (log π_θ(y|x) - log π_ref(y|x)); both the
chosen and the rejected reward often fall during training, and that is fine: the margin between
them is what the loss raises.

--loss_type (h = (log π_θ(y_w) - log π_ref(y_w)) - (log π_θ(y_l) - log π_ref(y_l))):
    sigmoid  DPO, Eq. 7. With --label_smoothing ε > 0 it is conservative DPO (cDPO, Mitchell 2023,
             https://ericmitchell.ai/cdpo.pdf), which assumes labels flipped with probability ε:
             -(1-ε) log σ(βh) - ε log σ(-βh)
    robust   robust DPO (Chowdhury et al. 2024, Eq. 8, https://arxiv.org/abs/2403.00409), an
             unbiased estimate of the clean loss under label-flip rate ε:
             [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε)
    ipo      IPO (Azar et al. 2023, Eq. 17, https://arxiv.org/abs/2310.12036): (h - 1/(2β))², with
             log-probs averaged over response tokens (as TRL)
    simpo    SimPO (Meng et al. 2024, Eq. 6, https://arxiv.org/abs/2405.14734):
             -log σ(β/|y_w| log π_θ(y_w) - β/|y_l| log π_θ(y_l) - γ), no reference
    kto      KTO (Ethayarajh et al. 2024, §4, https://arxiv.org/abs/2402.01306): for single
             completions labelled desirable or not (TRL's unpaired `prompt`/`completion`/`label`
             rows; a preference dataset counts as two rows per pair, chosen desirable and rejected
             not). With r = log π_θ(y|x) - log π_ref(y|x): λ_D (1 - σ(β (r - z_ref))) for a
             desirable y, λ_U (1 - σ(β (z_ref - r))) for an undesirable one. z_ref = max(0, mean r
             of mismatched completions), detached: an estimate of KL(π_θ || π_ref) from each
             example's prompt paired with the completion two rows on. That mismatched completion
             shares the example's prompt in the pair machinery, so the prompt goes through the
             model once for both; z_ref is per micro-batch (TRL: per device batch)
    orpo     ORPO (Hong et al. 2024, Eq. 6-7, https://arxiv.org/abs/2403.07691): the SFT loss on
             y_w plus λ = β times -log σ of the log odds ratio, log[odds(y_w)/odds(y_l)] with
             odds(y) = P(y)/(1-P(y)) and P(y) = exp(mean token log-prob); no reference model is
             loaded. The SFT term is each chosen response's token mean (the paper's Eq. 2; TRL
             averages over the chosen tokens of the whole batch)

How this deviates from the paper: the reference log-probs are computed once, before training, with
the starting policy (or --ref_model), so a single model is held while training (TRL's
precompute_ref_log_probs); chosen and rejected go through the model in one concatenated forward
pass. With LoRA (--lora_r) the reference is the policy with its adapter switched off: the same
weights, one model in memory, also with --precompute_ref_log_probs false.

    python dpo.py                    # embedded SmolLM2-135M-Instruct, built-in arithmetic pairs
    python dpo.py --model out/sft    # after sft.py
    python dpo.py --dataset Anthropic/hh-rlhf --max_length 512 --loss_type ipo
    torchrun --nproc_per_node=2 dpo.py ...          # DDP, same code path
    torchrun --nproc_per_node=2 dpo.py ... --fsdp   # FSDP2: weights, gradients, AdamW state sharded
"""
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import common
import tasks
from plumbing import data, formats, models, runs
from plumbing.args import POSITIVE, Shared, arg, at_least, check_args, default, parse_args
from plumbing.errors import Diverged, UserError


@dataclass
class Args(Shared):
    # ---- DPO, its variants, ORPO and KTO ---------------------------------------------------------
    loss_type: str = arg("sigmoid", "sigmoid (DPO), robust, ipo, simpo, orpo or kto; see the "
                         "module docstring")
    beta: Optional[float] = arg(None, "β: 0.1 by default, 2.0 for simpo (IPO's τ and ORPO's λ are "
                                "this β)")
    label_smoothing: float = arg(0.0, "ε: assumed label-flip rate for sigmoid (cDPO) and robust, "
                                 "in [0, 0.5)")
    simpo_gamma: float = arg(0.5, "γ, SimPO's target reward margin")
    desirable_weight: float = arg(1.0, "λ_D, KTO's weight of desirable examples")
    undesirable_weight: float = arg(1.0, "λ_U, KTO's weight of undesirable examples (KTO suggests "
                                    "λ_D n_D / (λ_U n_U) in [1, 4/3] when the two counts differ)")
    ref_model: Optional[str] = arg(None, "reference model (default: a frozen copy of the starting "
                                   "policy)")
    precompute_ref_log_probs: bool = arg(True, "compute the reference log-probs once before "
                                         "training so only the policy is held; "
                                         "--precompute_ref_log_probs false keeps the reference "
                                         "loaded")
    # ---- data and evaluation ---------------------------------------------------------------------
    max_length: int = arg(1024, "tokens of prompt + response; longer pairs are dropped, not cut")
    grader: str = arg("exact", "how answers are graded: exact (numbers exactly) or math_verify "
                      "(also equal as mathematics, by the math-verify library: pip install "
                      "math-verify)")
    eval_generations: int = arg(64, "held-out prompts answered greedily at start and end, graded "
                                "against their `answer` column (share boxed, share correct; 0: "
                                "off)")
    max_new_tokens: int = arg(96, "length limit of those answers")
    # ---- the shared arguments (plumbing/args.py) with this script's defaults ---------------------
    dataset: str = arg("arithmetic_preferences", "built-in task, local .jsonl/.json/.parquet/.csv "
                       "or Hub id with prompt/chosen/rejected or implicit-prompt chosen/rejected; "
                       "comma-separated for a mixture")
    eval_every: int = arg(25, "evaluate the held-out pairs every this many steps (and at the start "
                          "and the end)")
    output_dir: str = default("out/dpo")
    max_steps: int = default(40)
    learning_rate: float = default(5e-6)
    warmup_steps: int = default(4)
    min_lr_ratio: float = default(0.1)
    save_every: int = default(100)

    def __post_init__(self):
        if self.loss_type not in ("sigmoid", "robust", "ipo", "simpo", "orpo", "kto"):
            raise UserError(f"--loss_type {self.loss_type}: use sigmoid, robust, ipo, simpo, orpo "
                            "or kto")
        if self.beta is None:
            self.beta = 2.0 if self.loss_type == "simpo" else 0.1
        robust_without_eps = self.loss_type == "robust" and self.label_smoothing == 0
        if not 0 <= self.label_smoothing < 0.5 or robust_without_eps:
            raise UserError("--label_smoothing must be in [0, 0.5), and above 0 for --loss_type "
                            "robust")
        if self.label_smoothing and self.loss_type in ("ipo", "simpo", "orpo", "kto"):
            raise UserError("--label_smoothing applies to sigmoid and robust, not to --loss_type "
                            f"{self.loss_type}")
        check_args(self, beta=POSITIVE, simpo_gamma=at_least(0), desirable_weight=at_least(0),
                   undesirable_weight=at_least(0))


# --------------------------------------------------------------------------------------------------
# The losses: pure functions of per-pair log-probs, (B,) tensors -> (B,) losses
def sigmoid_loss(pi_logratios, ref_logratios, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, Eq. 7, https://arxiv.org/abs/2305.18290); cDPO
    (https://ericmitchell.ai/cdpo.pdf) when label_smoothing > 0. pi_logratios = log π_θ(y_w|x) -
    log π_θ(y_l|x), ref likewise."""
    logits = beta * (pi_logratios - ref_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def robust_loss(pi_logratios, ref_logratios, beta, label_smoothing):
    """Robust DPO (Chowdhury et al. 2024, eq. 8, https://arxiv.org/abs/2403.00409): unbiased under a
    label-flip rate ε = label_smoothing < 0.5."""
    logits = beta * (pi_logratios - ref_logratios)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def ipo_loss(pi_logratios, ref_logratios, beta):
    """IPO (Azar et al. 2023, Eq. 17, https://arxiv.org/abs/2310.12036): regress the log-ratio
    margin onto 1/(2β), with τ = β. Log-probs per token."""
    return (pi_logratios - ref_logratios - 1 / (2 * beta)) ** 2


def simpo_loss(pi_logratios, beta, gamma):
    """SimPO (Meng et al. 2024, Eq. 6, https://arxiv.org/abs/2405.14734): pi_logratios of
    length-normalised log-probs, margin γ, no reference."""
    return -F.logsigmoid(beta * pi_logratios - gamma)


def orpo_loss(chosen, rejected, lam):
    """ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691): chosen, rejected: (B,) mean token
    log-probs. Returns the (B,) losses L_SFT + λ L_OR (Eq. 6), L_OR = -log σ(log odds(y_w) - log
    odds(y_l)) (Eq. 7), and the (B,) log odds ratios."""
    def log_odds(lp):  # log(P/(1-P)), P = e^lp, stable near P = 1
        return lp - torch.log(-torch.expm1(lp))
    ratio = log_odds(chosen) - log_odds(rejected)
    return -chosen - lam * F.logsigmoid(ratio), ratio


def kto_loss(logratios, desirable, z_ref, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, §4, https://arxiv.org/abs/2402.01306, L_KTO = E[λ_y - v(x,
    y)]): logratios (B,) r = log π_θ(y|x) - log π_ref(y|x), desirable (B,) bools, z_ref the
    (detached) reference point -> (B,) losses."""
    return torch.where(desirable,
                       desirable_weight * (1 - torch.sigmoid(beta * (logratios - z_ref))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z_ref - logratios))))


REFERENCE_FREE = ("simpo", "orpo")


def preference_loss(chosen, rejected, ref_chosen, ref_rejected, args):
    """Per-pair losses and implicit rewards for --loss_type, from (B,) response log-probs (summed
    over tokens, or averaged for ipo, simpo and orpo: the caller passes what the loss needs)."""
    if args.loss_type == "simpo":
        losses = simpo_loss(chosen - rejected, args.beta, args.simpo_gamma)
        return losses, args.beta * chosen, args.beta * rejected
    if args.loss_type == "orpo":
        return orpo_loss(chosen, rejected, args.beta)[0], args.beta * chosen, args.beta * rejected
    pi, ref = chosen - rejected, ref_chosen - ref_rejected
    if args.loss_type == "sigmoid":
        losses = sigmoid_loss(pi, ref, args.beta, args.label_smoothing)
    elif args.loss_type == "robust":
        losses = robust_loss(pi, ref, args.beta, args.label_smoothing)
    else:
        losses = ipo_loss(pi, ref, args.beta)
    return losses, args.beta * (chosen - ref_chosen), args.beta * (rejected - ref_rejected)


# --------------------------------------------------------------------------------------------------
def response_logps(model, pairs, rt, pad_id):
    """Chosen and rejected of `pairs` in one pass -> per-sequence summed response log-probs and
    response lengths, each (2B,): the B chosen first, then the B rejected. The prompt a pair's
    responses share goes through the model once, its KV cache feeding both
    (common.shared_prefix_logits); with gradient checkpointing, which keeps no cache, the 2B whole
    sequences go through one concatenated forward."""
    # KTO's items carry a label third
    chosen, rejected = [p[0] for p in pairs], [p[1] for p in pairs]
    seqs, dev = chosen + rejected, rt.device  # (ids, labels) of the 2B sequences

    def start(labels):  # the first labelled token
        return next(j for j, l in enumerate(labels) if l != common.IGNORE_INDEX)

    def shared(a, b):  # the length of the common prefix
        return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    # n: where a pair's sequences part; before it (prompt, assistant header) both are the same
    # tokens.
    n = [min(start(cl), start(rl), shared(c, r)) for (c, cl), (r, rl) in zip(chosen, rejected)]
    if common.can_share_prefix(model) and min(n) > 0:
        prefix, prefix_mask = common.pad([c[:k] for (c, _), k in zip(chosen, n)], pad_id,
                                         side="left")
        x, mask = common.pad([ids[k:] for (ids, _), k in zip(seqs, n + n)], pad_id)
        targets, _ = common.pad([labels[k:] for (_, labels), k in zip(seqs, n + n)],
                                common.IGNORE_INDEX)  # (2B, Tr)
        index = torch.arange(len(pairs)).repeat(2)  # row i continues pair i mod B
        # (2B, Tr, V): position t predicts targets[:, t]
        logits = common.shared_prefix_logits(model, prefix.to(dev), prefix_mask.to(dev),
                                             index.to(dev), x.to(dev), mask.to(dev), rt)
        targets = targets.to(dev)
    else:
        x, mask = common.pad([ids for ids, _ in seqs], pad_id)
        y, _ = common.pad([labels for _, labels in seqs], common.IGNORE_INDEX)
        # prompt positions skipped
        logits, targets = common.label_logits(model, x.to(dev), mask.to(dev), y.to(dev), rt)
    keep = targets != common.IGNORE_INDEX
    logps = common.gather_logprobs(logits, targets.clamp(min=0)) * keep
    return logps.sum(-1), keep.sum(-1)


@torch.no_grad()
def reference_logps(model, pairs, rt, pad_id, batch_size):
    """Summed response log-probs of the reference for every pair -> (N, 2) tensor [chosen, rejected]
    on the CPU. A LoRA policy is its own reference with the adapter off."""
    was_training, out = model.training, []
    model.eval()
    with models.adapter_off(model):
        for i in range(0, len(pairs), batch_size):
            lp, _ = response_logps(model, pairs[i : i + batch_size], rt, pad_id)
            out.append(lp.view(2, -1).t().float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")
EXTRA_METRICS = {"orpo": ("nll_loss", "log_odds_ratio")}
KTO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
               "count/chosen", "count/rejected", "kl")


def metric_names(loss_type):
    return KTO_METRICS if loss_type == "kto" else METRICS + EXTRA_METRICS.get(loss_type, ())


def batch_metrics(model, pairs, ref, args, rt, pad_id):
    """Loss terms and metric sums of one micro-batch. ref: (B, 2) summed reference log-probs, or
    None for simpo and orpo. For KTO the pairs are (completion, mismatched completion, desirable)
    and chosen/rejected mean desirable and undesirable examples."""
    logps, lengths = response_logps(model, pairs, rt, pad_id)
    B = len(pairs)
    chosen, rejected = logps[:B], logps[B:]
    if args.loss_type == "kto":
        desirable = torch.tensor([p[2] for p in pairs], device=logps.device)
        r, r_kl = chosen - ref[:, 0], (rejected - ref[:, 1]).detach()
        z_ref = r_kl.mean().clamp(min=0)  # the reference point, not differentiated through (KTO §4)
        losses = kto_loss(r, desirable, z_ref, args.beta, args.desirable_weight,
                          args.undesirable_weight)
        d, u = desirable.float(), (~desirable).float()
        sums = {"loss": losses.sum(), "rewards/chosen": (args.beta * r * d).sum(),
                "rewards/rejected": (args.beta * r * u).sum(), "logps/chosen": (chosen * d).sum(),
                "logps/rejected": (chosen * u).sum(), "count/chosen": d.sum(),
                "count/rejected": u.sum(), "kl": z_ref * B}
        return losses.sum(), {k: v.detach().float() for k, v in sums.items()}
    if args.loss_type in ("ipo", "simpo", "orpo"):  # these compare per-token mean log-probs
        pc, pr = chosen / lengths[:B], rejected / lengths[B:]
        rc, rr = (None, None)
        if ref is not None:
            rc, rr = ref[:, 0] / lengths[:B], ref[:, 1] / lengths[B:]
    else:
        pc, pr = chosen, rejected
        rc, rr = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
    losses, r_chosen, r_rejected = preference_loss(pc, pr, rc, rr, args)
    sums = {"loss": losses.sum(), "rewards/chosen": r_chosen.sum(),
            "rewards/rejected": r_rejected.sum(), "rewards/margins": (r_chosen - r_rejected).sum(),
            "rewards/accuracies": (r_chosen > r_rejected).float().sum(),
            "logps/chosen": chosen.sum(), "logps/rejected": rejected.sum()}
    # ORPO's two terms, as TRL logs them (B scalars: recomputing the ratio costs nothing)
    if args.loss_type == "orpo":
        log_odds_ratio = orpo_loss(pc, pr, args.beta)[1]
        sums.update({"nll_loss": -pc.sum(), "log_odds_ratio": log_odds_ratio.sum()})
    return losses.sum(), {k: v.detach().float() for k, v in sums.items()}


def reduce_metrics(totals, n, rt, loss_type):
    """Metric sums of the micro-batches -> means over the n examples of all ranks. KTO's rewards and
    log-probs are means over the desirable (chosen) and the undesirable (rejected) examples, as TRL
    logs them."""
    row = {k: (common.all_reduce(v, rt) / n).item() for k, v in totals.items()}
    if loss_type == "kto":
        count = {side: row.pop(f"count/{side}") for side in ("chosen", "rejected")}
        for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            c = count[key.split("/")[1]]
            if c:
                row[key] /= c
            else:
                del row[key]  # no example of that kind in this batch
        if count["chosen"] and count["rejected"]:
            row["rewards/margins"] = row["rewards/chosen"] - row["rewards/rejected"]
    return row


# --------------------------------------------------------------------------------------------------
# KTO's data: single completions, each desirable or not
class Unpaired:
    """KTO's examples: TRL's unpaired rows (`prompt`, `completion`, `label`), or a preference
    dataset read as two rows per pair, chosen desirable and rejected not (as TRL's
    unpair_preference_dataset). Each example comes with the completion two rows on, under the
    example's prompt: the mismatched sample KTO's z_ref is estimated from (two on, so that a pair's
    rejected never stands in for its own chosen)."""

    def __init__(self, ds):
        self.ds, self.unlimited = ds, getattr(ds, "unlimited", False)
        self.paired = "label" not in ds[0]
        self.n = len(ds) * (2 if self.paired else 1)
        self.example(0)  # checks the columns before any work
        if self.n < 3:
            raise UserError("KTO needs at least 3 examples (one's mismatched completion is "
                            "another's)")

    def __len__(self):
        return self.n

    def example(self, i):
        with formats.at_row(i // 2 if self.paired else i):
            return self._example(i)

    def _example(self, i):
        if self.paired:
            prompt, chosen, rejected = formats.preference_pair(self.ds[i // 2])
            return prompt, chosen if i % 2 == 0 else rejected, i % 2 == 0
        row = self.ds[i]
        if "prompt" not in row or "completion" not in row:
            raise UserError(f"columns found: {sorted(row)}; KTO's unpaired rows need `prompt`, "
                            "`completion` and `label`")
        label = str(row["label"]).lower()
        if label not in ("true", "false", "1", "0"):
            raise UserError(f"`label` {row['label']!r}: use true (desirable) or false")
        prompt = formats.as_messages(row["prompt"], "user", "prompt")
        completion = formats.as_messages(row["completion"], "assistant", "completion")
        return prompt, completion, label in ("true", "1")

    def encode(self, i, tok, max_length):
        """(prompt + completion, prompt + the completion two rows on, desirable) tokenized; None
        when too long."""
        prompt, completion, desirable = self.example(i)
        mismatched = self.example((i + 2) % self.n)[1]
        x = formats.tokenize_pair(tok, prompt, completion, mismatched, max_length)
        return None if x is None else (*x, desirable)


def unpaired_items(view, tok, max_length, name, rt):
    items = [view.encode(i, tok, max_length) for i in range(len(view))]
    kept = [x for x in items if x is not None]
    rt.print(f"data: {name}: {len(kept)} examples kept ({sum(x[2] for x in kept)} desirable), "
             f"{len(items) - len(kept)} dropped longer than --max_length {max_length} or with no "
             "response token")
    if not kept:
        raise UserError(f"no example of {name} is left after filtering; check the data or raise "
                        "--max_length")
    return kept


# --------------------------------------------------------------------------------------------------
# The data a run reads, the reference's log-probs of it, and the held-out evaluation
def load_rows(args):
    """The rows of the training mixture and the held-out rows, their columns checked before any
    work (KTO: read as single completions with a label)."""
    mixture, raw, heldout = data.load_splits(args, max(args.eval_size, args.eval_generations))
    if args.loss_type == "kto":
        # single completions with a label; this checks the columns
        raw = [Unpaired(ds) for ds in raw]
    else:
        for ds in raw:
            formats.preference_pair(ds[0])  # checks the columns before any work
    return mixture, raw, heldout


class PairStream:
    """The pairs (KTO: examples) this rank trains on, in stream order: step k reads keys(k), each
    key a (source, row) pair; finite sources are tokenized up front (filtered and counted),
    generated ones when first read."""

    def __init__(self, args, mixture, raw, tok, rt):
        self.args, self.tok, self.kto, self.cache = args, tok, args.loss_type == "kto", {}
        self.sources = [ds if getattr(ds, "unlimited", False)
                        else unpaired_items(ds, tok, args.max_length, name, rt) if self.kto
                        else formats.tokenize_preferences(ds, tok, args.max_length, name, rt)
                        for (name, _), ds in zip(mixture, raw)]
        self.names = [name for name, _ in mixture]
        unlimited = {i for i, s in enumerate(self.sources) if not isinstance(s, list)}
        order = data.mixture_order([len(s) for s in self.sources], [w for _, w in mixture],
                                   args.max_steps * args.batch_size, args.seed, unlimited=unlimited)
        self.mine = [order[k] for k in range(len(order))
                     if (k % args.batch_size) % rt.world_size == rt.rank]
        self.per_rank = args.batch_size // rt.world_size

    def keys(self, step):
        return self.mine[step * self.per_rank : (step + 1) * self.per_rank]

    def __getitem__(self, key):
        s, i = key
        if key not in self.cache:
            src, a = self.sources[s], self.args
            if isinstance(src, list):
                self.cache[key] = src[i]
            elif self.kto:
                self.cache[key] = src.encode(i, self.tok, a.max_length)
            else:
                with formats.at_row(i, self.names[s]):
                    pair = formats.preference_pair(src[i])
                self.cache[key] = formats.tokenize_pair(self.tok, *pair, a.max_length)
            if self.cache[key] is None:
                raise UserError(f"a generated pair of {self.names[s]} exceeds --max_length "
                                f"{a.max_length}; raise it")
        return self.cache[key]


def heldout_sets(args, heldout, tok, rt):
    """The held-out pairs (the preference metrics) and the held-out prompts with an `answer` (greedy
    accuracy)."""
    rows = [heldout[i] for i in range(min(args.eval_size, len(heldout)))]
    if not rows:
        pairs = []
    elif args.loss_type == "kto":
        pairs = unpaired_items(Unpaired(rows), tok, args.max_length, "held-out", rt)
    else:
        pairs = formats.tokenize_preferences(rows, tok, args.max_length, "held-out", rt)
    answerable = [heldout[i] for i in range(min(args.eval_generations, len(heldout)))
                  if "answer" in heldout[i]]
    prompts = [formats.as_messages(r["prompt"], "user") if "label" in r
               else formats.preference_pair(r)[0] for r in answerable]
    return pairs, prompts, [r["answer"] for r in answerable]


class Reference:
    """log π_ref of the pairs, (B, 2) [chosen, rejected]; None for simpo and orpo, which have no
    reference. The reference is --ref_model or the starting policy. With --precompute_ref_log_probs
    (the default) they are computed once, before the first update, for every pair this rank will
    see and every held-out pair, so that no second model is held while training; otherwise a frozen
    copy scores each batch (with LoRA: the policy, its adapter off)."""

    def __init__(self, args, model, path, tok, rt, train, eval_pairs):
        self.rt, self.pad_id, self.table, self.eval_table = rt, tok.pad_token_id, None, None
        self.model = None
        if args.loss_type in REFERENCE_FREE:
            return
        if args.ref_model:
            ref_path = models.resolve_model(args.ref_model, rt, "--ref_model")
            models.check_same_vocab(tok, ref_path, "--ref_model", args.trust_remote_code)
            ref = models.load_frozen(ref_path, rt, args.trust_remote_code)
        elif args.precompute_ref_log_probs or hasattr(model, "peft_config"):
            # the starting policy: as it is when its log-probs are precomputed before it changes, or
            # with LoRA the policy with its adapter off (models.adapter_off)
            ref = model
        else:  # otherwise a frozen copy, loaded from `path` again
            ref = models.load_frozen(path, rt, args.trust_remote_code)
        if not args.precompute_ref_log_probs:
            self.model = ref
            return
        t0, keys = time.perf_counter(), list(dict.fromkeys(train.mine))
        mine_eval = eval_pairs[rt.rank :: rt.world_size]
        table = reference_logps(ref, [train[k] for k in keys], rt, self.pad_id,
                                args.micro_batch_size)
        self.table = dict(zip(keys, table))
        self.eval_table = reference_logps(ref, mine_eval, rt, self.pad_id, args.micro_batch_size)
        rt.print(f"reference log-probs of {len(keys) + len(eval_pairs)} pairs computed in "
                 f"{time.perf_counter() - t0:.0f}s")

    def __call__(self, pairs, keys=None, eval_index=None):
        """The reference log-probs of pairs: those of the training stream by their keys, held-out
        ones by their index among this rank's held-out pairs."""
        if self.table is not None and keys is not None:
            return torch.stack([self.table[k] for k in keys]).to(self.rt.device)
        if self.eval_table is not None and eval_index is not None:
            return self.eval_table[eval_index : eval_index + len(pairs)].to(self.rt.device)
        if self.model is None:
            return None
        logps = reference_logps(self.model, pairs, self.rt, self.pad_id, len(pairs))
        return logps.to(self.rt.device)


@torch.no_grad()
def evaluate(model, ref, eval_pairs, prompts, answers, tok, args, rt, generate):
    """The held-out metrics: the loss and the preference metrics of the held-out pairs (eval_ + the
    training names), each rank scoring its share; with generate, also the greedy answers to the
    held-out prompts, graded."""
    row = {}
    with common.unsharded(model):  # FSDP: whole weights on each rank, which needs no collective
        if eval_pairs:
            model.eval()
            mine_eval = eval_pairs[rt.rank :: rt.world_size]
            # every rank all-reduces every key, even with no pairs of its own
            totals = dict.fromkeys(metric_names(args.loss_type), 0.0)
            for i in range(0, len(mine_eval), args.micro_batch_size):
                batch = mine_eval[i : i + args.micro_batch_size]
                ref_logps = ref(batch, eval_index=i)
                _, sums = batch_metrics(model, batch, ref_logps, args, rt, tok.pad_token_id)
                totals = {k: totals[k] + v for k, v in sums.items()}
            means = reduce_metrics(totals, len(eval_pairs), rt, args.loss_type)
            row = {f"eval_{k}": v for k, v in means.items()}
            model.train()
        if generate and prompts:
            row.update(tasks.evaluate_answers(model, tok, prompts, answers, rt, args.max_new_tokens,
                                              grader=args.grader)[0])
    return row


# --------------------------------------------------------------------------------------------------
def main():
    args = parse_args(Args)
    rt = common.setup(args.seed, args.device, args.precision)
    runs.split_batch(args, rt, cap=8)
    ckpt_path = runs.claim_output_dir(args, rt)

    # The pairs (KTO: single completions with a label), tokenized; the held-out pairs and prompts
    mixture, raw, heldout = load_rows(args)
    path = models.resolve_model(args.model, rt)
    models.check_lengths(args, path, args.trust_remote_code)
    tok = models.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    train = PairStream(args, mixture, raw, tok, rt)
    eval_pairs, prompts, answers = heldout_sets(args, heldout, tok, rt)

    model = models.load_trained(path, rt, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    # DDP or FSDP under torchrun; before the optimizer (FSDP shards the weights)
    ddp = common.distribute(model, args, rt)
    # FSDP: whole weights on each rank for the reference log-probs (ranks' shares differ)
    with common.unsharded(model):
        ref = Reference(args, model, path, tok, rt, train, eval_pairs)
    opt, sched = runs.optimizer_and_schedule(model, args)
    step = 0
    if args.resume:
        state = runs.restore_state(ckpt_path, model, opt, sched, args, rt,
                                   must_match=("loss_type", "beta"))
        step = state["step"]
    run = runs.Run(args, rt, step, ckpt_path)

    def held_out(generate):
        return evaluate(model, ref, eval_pairs, prompts, answers, tok, args, rt, generate)

    if step == 0:
        run.first({"step": 0, **held_out(generate=True)})
    row = {"step": step}
    model.train()
    while step < run.last:
        t0 = time.perf_counter()
        # ---- [algorithm] 1. The loss of --loss_type over the batch's pairs (KTO: examples) and its
        # gradient, micro-batch by micro-batch, against the reference's log-probs of them
        # (precomputed, or scored now)
        keys, totals = train.keys(step), {}
        for k in range(0, train.per_rank, args.micro_batch_size):
            keys_mb = keys[k : k + args.micro_batch_size]
            pairs = [train[key] for key in keys_mb]
            with common.no_sync(ddp, k + args.micro_batch_size < train.per_rank):
                ref_logps = ref(pairs, keys=keys_mb)
                loss_sum, sums = batch_metrics(ddp, pairs, ref_logps, args, rt, tok.pad_token_id)
                # Mean over the pairs of the whole batch; DDP averages over ranks, so scale by
                # world_size.
                (loss_sum * rt.world_size / args.batch_size).backward()
            totals = {n: totals.get(n, 0) + v for n, v in sums.items()}
        row = reduce_metrics(totals, args.batch_size, rt, args.loss_type)
        if not math.isfinite(row["loss"]):
            raise Diverged(f"the loss became {row['loss']} at step {step + 1}")

        # ---- [algorithm] 2. Update: one AdamW step on the clipped gradient
        grad_norm = common.clip_grad_norm(model, args.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        runs.report_memory(model, opt, rt)  # once: what a rank holds
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # ---- [plumbing] 3. Metrics, held-out evaluation, checkpoint
        row = {"step": step, **row, "learning_rate": lr, "grad_norm": grad_norm,
               "seconds_per_step": time.perf_counter() - t0}
        if run.eval_due(step):
            row.update(held_out(generate=step == args.max_steps))
        run.logged(row, loss=row["loss"], margin=row.get("rewards/margins", math.nan),
                   acc=row.get("rewards/accuracies", math.nan))
        run.checkpoint(step, model, opt, sched, tok)
    run.end(step, model, tok, row)


if __name__ == "__main__":
    runs.run(main)
