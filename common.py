"""What every method shares and what defines the policy's numbers: the one shared module to read.

Setup (device, DDP/FSDP, precision, seeds), padding, chat-template masking (which tokens are
trained), log-prob gathering (from logits / temperature, the KV cache shared by a GRPO group's
prompt), the sampler (batched, with the KV cache: the exact distribution every log-prob of RL is
computed against; the weights for a sampler that is not), reward-model scores. A loss, an advantage
or a rollout lives in its method's script; the environment (tasks, prompts, grader, rewards) in
tasks.py, tools.py; loading, formats, arguments, logs, checkpoints in plumbing/ (never needed).
"""
import inspect
import os
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing.errors import Diverged, UserError
from plumbing.models import unwrap

IGNORE_INDEX = -100  # label of a token that is not trained (cross_entropy's ignore_index)


# --------------------------------------------------------------------------------------------------
# Device, distributed, precision, seeds
@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; parameters stay fp32 ("master weights")
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def print(self, *a, **kw):
        if self.is_main:
            print(*a, **kw, flush=True)


def cpu_has_fast_bf16():
    # bf16 autocast pays off only with AVX512-BF16 or AMX; elsewhere it's emulated, slower than fp32
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False


def setup(seed, device="auto", precision="auto"):
    """Pick device and precision, start DDP under torchrun (RANK is set), seed every RNG."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = ("cuda" if torch.cuda.is_available()
                  else "mps" if torch.backends.mps.is_available() else "cpu")
    if device not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: use auto, cpu, cuda or mps")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    if "RANK" in os.environ:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    dev = (torch.device(device, int(os.environ.get("LOCAL_RANK", 0))) if device == "cuda"
           else torch.device(device))
    if precision == "auto":
        fast = (torch.cuda.is_bf16_supported() if device == "cuda"
                else cpu_has_fast_bf16() if device == "cpu" else False)
        precision = "bf16" if fast else "fp32"
    if precision not in ("bf16", "fp32"):
        raise UserError(f"--precision {precision}: use auto, bf16 or fp32")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(seed)
    return Runtime(dev, torch.bfloat16 if precision == "bf16" else torch.float32, rank, world_size)


def distribute(model, args, rt):
    """The model as the ranks train it: itself in one process; under torchrun DDP (a whole copy per
    rank, gradients all-reduced); or with --fsdp FSDP2 (torch's fully_shard; Zhao et al. 2023,
    arXiv:2304.11277): every decoder layer, then the rest, sharded over the ranks, each holding 1/N
    of the weights, gradients and AdamW state. Under bf16 the weights are gathered in bf16 and the
    gradients reduced in fp32 (MixedPrecisionPolicy, as torchtitan). Call it before building the
    optimizer: fully_shard replaces the parameters by sharded DTensors."""
    if not getattr(args, "fsdp", False):
        return DDP(model) if rt.world_size > 1 else model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
    # e.g. LlamaDecoderLayer
    layers = {n for m in model.modules() for n in getattr(m, "_no_split_modules", None) or ()}
    for m in list(model.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # the root is this module, whichever runs first (ppo.py samples with a part)
    model._get_fsdp_state()._lazy_init()
    return model


def no_sync(model, skip):
    """Gradient accumulation under DDP: with skip, this backward leaves its gradients on the rank
    (DDP's no_sync); the backward of the last micro-batch all-reduces their sum. Under FSDP every
    backward reduce-scatters its gradients into the rank's shards: skipping would hold the unsharded
    gradient on each rank between micro-batches (4 bytes per parameter), the memory FSDP saves."""
    return model.no_sync() if skip and isinstance(model, DDP) else nullcontext()


@contextmanager
def unsharded(model):
    """Under FSDP: every weight gathered whole on each rank for the duration (sampling, evaluation),
    so that forward passes need no collective and ranks may run different numbers of them; sharded
    again after. Otherwise nothing."""
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        # defaults again: layers reshard after forward; the root (first) keeps weights for backward
        for i, m in enumerate(fsdp):
            m.set_reshard_after_forward(i > 0, recurse=False)
            m.reshard()


def clip_grad_norm(model, max_norm):
    """Clip the gradients' global norm to max_norm; returns the norm before clipping (a float, whole
    over shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def all_reduce(x, rt, op="sum"):
    """Sum (or max) a float or tensor over DDP ranks; returns a tensor on the runtime device."""
    t = torch.as_tensor(x, dtype=torch.float64 if rt.device.type != "mps" else torch.float32,
                        device=rt.device)
    if rt.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_reduce_sums(sums, rt):
    """{name: number or one-element tensor} summed over DDP ranks in one call -> {name: float}."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=rt.device).reshape(())
                     for v in sums.values()])
    return dict(zip(sums, all_reduce(t, rt).tolist()))


# --------------------------------------------------------------------------------------------------
# Padding
def pad(seqs, value, side="right"):
    """List of int (or, with a float value, float) lists -> (B, T) tensor padded with `value`, and
    the (B, T) mask, which comes from lengths, never from token ids."""
    T = max(len(s) for s in seqs)
    dtype = torch.float32 if isinstance(value, float) else torch.long
    out = torch.full((len(seqs), T), value, dtype=dtype)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        out[i, sl] = torch.tensor(s, dtype=dtype)
        mask[i, sl] = 1
    return out, mask


# --------------------------------------------------------------------------------------------------
# Chat-template masking: which tokens are trained
MARKER = "\x00MARKER\x00"  # stands in for an assistant message's content to find where it starts


def tokenize_conversation(tok, messages, max_length, train_from=0, **template_kwargs):
    """Tokens of a chat-templated conversation (template_kwargs: its `tools`) and labels: the token
    id where the model is trained (every assistant content token and the assistant's end-of-turn
    token) and IGNORE_INDEX elsewhere (system, user and tool turns, assistant headers, whitespace).
    Works without `{% generation %}` markers: the assistant spans are found by rendering the
    conversation up to each assistant turn with and without it. Only assistant messages at index >=
    train_from are trained (preference pairs: their last response, not the prompt's turns).
    Returns (input_ids, labels) cut to max_length, or None when no trained token is left."""
    text = tok.apply_chat_template(messages, tokenize=False, **template_kwargs)
    marker = MARKER
    while marker in text:  # a marker that the conversation itself never contains
        marker += "\x00"
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        # Where the content starts: render the conversation to this turn with a marker as content.
        marked = tok.apply_chat_template(messages[:i] + [{"role": "assistant", "content": marker}],
                                         tokenize=False, **template_kwargs)
        start = marked.find(marker)
        turn = tok.apply_chat_template(messages[: i + 1], tokenize=False, **template_kwargs)
        if start < 0 or not text.startswith(turn) or turn[:start] != marked[:start]:
            raise UserError("the chat template renders earlier turns differently once later turns "
                            "are added; pass a prefix-consistent template with --chat_template")
        end = start + len(turn[start:].rstrip())  # the newline after <|im_end|> is formatting
        spans.append((start, end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (a, b) in enumerate(enc["offset_mapping"][: len(ids)]):
        if any(a < e and b > s for s, e in spans):  # the token overlaps an assistant span
            labels[j] = ids[j]
    if all(l == IGNORE_INDEX for l in labels):
        return None
    return ids, labels


# --------------------------------------------------------------------------------------------------
# Log-probs
def gather_logprobs(logits, tokens, temperature=1.0, chunk_size=256):
    """log p(tokens | context): (..., V) logits and (...) token ids -> (...) fp32 log-probs.

    log_softmax(z)[y] = z[y] - logsumexp(z), computed over chunks of rows so that no (B, T, V) fp32
    log-softmax is ever built (the logits may be bf16: each chunk is upcast on its own). Divide by
    the sampling temperature here, or the ratios and KLs of RL are computed against a different
    distribution than the one sampled."""
    flat, toks = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    out = torch.empty(toks.shape, dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], chunk_size):
        z = flat[i : i + chunk_size].float()
        if temperature != 1.0:
            z = z / temperature
        out[i : i + chunk_size] = (z.gather(-1, toks[i : i + chunk_size, None]).squeeze(-1)
                                   - torch.logsumexp(z, -1))
    return out.view(tokens.shape)


def label_logits(model, input_ids, attention_mask, labels, rt):
    """The logits that predict the labelled tokens of a right-padded batch, and those labels:
    (B, K, V) and (B, K), K covering the positions from the batch's earliest labelled token on.
    lm_head, the vocabulary projection (a fifth of a small model's compute), runs only there, not
    over the prompts (logits_to_keep: a model's own logit scaling or soft-capping still applies)."""
    targets = labels[:, 1:]  # (B, T-1): the logits at t predict token t+1
    first = int((targets != IGNORE_INDEX).any(0).int().argmax())  # the earliest column with a label
    with rt.autocast():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=labels.shape[1] - first).logits[:, :-1]  # at first .. T-2
    return logits, targets[:, first:]


def token_entropy(logits, temperature=1.0, chunk_size=256):
    """(..., V) logits -> (...) entropy H(p) = logsumexp(z) - Σ p z of the sampling distribution
    (z = logits / T), in fp32, chunked like gather_logprobs. This is the policy's entropy, not the
    NLL of the sampled token."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], chunk_size):
        z = flat[i : i + chunk_size].float() / temperature
        out[i : i + chunk_size] = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    return out.view(logits.shape[:-1])


def cache_kwarg(model):
    """The keyword for this model's KV cache in forward (transformers 5 renames past_key_values)."""
    model = unwrap(model)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def can_share_prefix(model):
    """Not under gradient checkpointing (it keeps no KV cache) nor FSDP (the gradient through the
    prefix's keys and values comes outside FSDP's backward hooks, after the layer's gathered weights
    may be freed: reward_model.py's backward fails so)."""
    return not any(getattr(m, "gradient_checkpointing", False) or isinstance(m, FSDPModule)
                   for m in getattr(model, "module", model).modules())


def shared_prefix_logits(model, prefix_ids, prefix_mask, index, rest_ids, rest_mask, rt):
    """The logits that predict every token of rest_ids (N, Tr, right-padded), where row i continues
    prefix index[i] of prefix_ids (U, P, left-padded). Each prefix goes through the model once and
    its KV cache, gradient included, is copied to the rows that continue it: a GRPO group's prompt
    is computed once instead of G times, a DPO pair's once instead of twice, and the gradients are
    the same (tested). Returns (N, Tr, V); position t predicts token t."""
    from transformers import DynamicCache
    inner = getattr(model, "module", model)  # the prefix pass uses the bare model: one DDP forward
    cache = DynamicCache(config=inner.config)
    kv = {cache_kwarg(model): cache}
    mask = torch.cat([prefix_mask[index], rest_mask], 1)
    positions = (prefix_mask.sum(-1)[index, None]
                 + torch.arange(rest_ids.shape[1], device=rest_ids.device))
    with rt.autocast():
        first = inner(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True,
                      logits_to_keep=1, position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
                      **kv).logits  # (U, 1, V)
        cache.batch_select_indices(index)  # U prefixes -> N rows
        rest = model(input_ids=rest_ids, attention_mask=mask, position_ids=positions,
                     use_cache=True, **kv).logits
    return torch.cat([first[index], rest[:, :-1]], 1)  # (N, Tr, V): prefix's last logit -> token 0


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, rt,
                        temperature=1.0, with_entropy=False, group_size=1):
    """log π(y_t | x, y_<t) of every completion token, for prompts left-padded (N, P) and
    completions right-padded (N, Tc) as generation lays them out. Position ids come from the
    attention mask, so left padding does not shift them, and lm_head runs only on the Tc positions
    that predict completion tokens. Returns (N, Tc) fp32 log-probs (garbage where completion_mask
    is 0) and, if asked, the (N, Tc) entropies (computed without gradient). With group_size G > 1,
    rows g*G .. g*G+G-1 share one prompt (a GRPO group), computed once (shared_prefix_logits)."""
    if group_size > 1 and can_share_prefix(model):
        N = len(prompt_ids)
        logits = shared_prefix_logits(model, prompt_ids[::group_size], prompt_mask[::group_size],
                                      torch.arange(N, device=prompt_ids.device) // group_size,
                                      completion_ids, completion_mask, rt)
    else:
        x, mask = (torch.cat([prompt_ids, completion_ids], 1),
                   torch.cat([prompt_mask, completion_mask], 1))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        Tc = completion_ids.shape[1]
        with rt.autocast():
            # (N, Tc, V): the logits at P-1+t predict token t
            logits = model(input_ids=x, attention_mask=mask, position_ids=positions,
                           use_cache=False, logits_to_keep=Tc + 1).logits[:, :-1]
    logp = gather_logprobs(logits, completion_ids, temperature)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        return logp, token_entropy(logits.detach(), temperature)


# --------------------------------------------------------------------------------------------------
# The sampler: batched generation with the KV cache
def encode_prompts(tok, prompts, **template_kwargs):
    """Message-list prompts -> token ids: chat template (template_kwargs: its `tools`) + assistant
    header (generation prompt)."""
    return [tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False,
                                        **template_kwargs),
                add_special_tokens=False)["input_ids"] for p in prompts]


def sample_tokens(logits, temperature=1.0, top_p=1.0):
    """(B, V) logits -> (B,) token ids drawn from exactly softmax(logits / temperature), restricted
    to the smallest set of most likely tokens whose mass reaches top_p (nucleus) when top_p < 1;
    argmax when temperature is 0. Inverse-CDF sampling: one uniform number per row against the
    cumulative distribution (fp64), which is much cheaper on a CPU than torch.multinomial's one
    exponential draw per vocabulary entry."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        p, order = probs.sort(-1, descending=True)
        p[p.cumsum(-1) - p >= top_p] = 0  # top_p reached before it: drop it (never the first)
        probs = torch.zeros_like(probs).scatter_(-1, order, p)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    # the first token with cdf > u
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


@torch.no_grad()
def generate_ids(model, tok, prompt_ids, rt, max_new_tokens=128, batch_size=32, temperature=0.0,
                 top_p=1.0, return_logprobs=False):
    """Sampling (greedy at temperature 0) with the KV cache, batch_size completions at a time, from
    token-id prompts -> the completions' ids, each cut after its first stop token (kept: the stop
    action; tok.stop_ids, the template's end of turn and the EOS ids: models.stop_ids), and with
    return_logprobs each token's log-prob under softmax(logits / temperature) (fp32 lists).

    Our loop, not model.generate's, so that the distribution is exactly the one every log-prob of
    RL is computed against (generate would also apply a checkpoint's generation_config.json:
    repetition_penalty, top_k...). Faster too: a GRPO group's prompt is prefilled once and its
    cache copied; stopped rows leave the batch; one autocast region casts each weight to bf16 once
    per call (it caches casts of weights that require grad; models.freeze pre-casts the frozen)."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    from transformers import DynamicCache
    dev, T = rt.device, max_new_tokens
    stop = torch.tensor(tok.stop_ids, device=dev)
    out_ids, out_logps = [], []
    for i in range(0, len(prompt_ids), batch_size):
        chunk = [tuple(p) for p in prompt_ids[i : i + batch_size]]
        unique = list(dict.fromkeys(chunk))
        first = {p: k for k, p in enumerate(unique)}
        copies = torch.tensor([first[p] for p in chunk], device=dev)  # (B,): row -> unique prompt
        x, mask = (t.to(dev) for t in pad(unique, tok.pad_token_id, side="left"))
        cache = DynamicCache(config=model.config)
        kv = {cache_kwarg(model): cache}
        tokens = torch.full((len(chunk), T), tok.pad_token_id, dtype=torch.long, device=dev)
        logps = torch.zeros((len(chunk), T), dtype=torch.float32, device=dev)
        with rt.autocast():
            logits = model(input_ids=x, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                           logits_to_keep=1, **kv).logits[:, -1]
            cache.batch_select_indices(copies)  # one cache row per completion
            if not torch.isfinite(logits).all():
                raise Diverged("the model's logits became inf or nan")
            logits, mask = logits[copies], mask[copies]
            rows = torch.arange(len(chunk), device=dev)  # the rows still generating
            for t in range(T):
                y = sample_tokens(logits, temperature, top_p)  # (b,)
                tokens[rows, t] = y
                if return_logprobs:
                    logps[rows, t] = gather_logprobs(logits, y, temperature or 1.0)
                if t == T - 1:
                    break
                going = ~torch.isin(y, stop)
                if not going.all():  # finished rows leave the batch (and the cache)
                    if not going.any():
                        break
                    keep = going.nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    rows, y, mask = rows[keep], y[keep], mask[keep]
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
                logits = model(input_ids=y[:, None], attention_mask=mask,
                               position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True,
                               **kv).logits[:, -1]
        stopped = torch.isin(tokens, stop)
        lengths = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, T)  # to the first stop
        for row, lp, n in zip(tokens.tolist(), logps.tolist(), lengths.tolist()):
            out_ids.append(row[:n])
            out_logps.append(lp[:n])
    model.train(was_training)
    return (out_ids, out_logps) if return_logprobs else out_ids


def generate(model, tok, prompts, rt, max_new_tokens=128, batch_size=32, temperature=0.0,
             top_p=1.0):
    """generate_ids for message-list prompts; returns (completion ids, completion texts)."""
    ids = generate_ids(model, tok, encode_prompts(tok, prompts), rt, max_new_tokens, batch_size,
                       temperature, top_p)
    return ids, [tok.decode(row, skip_special_tokens=True) for row in ids]


SAMPLER_WEIGHT_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_weights(old_logp, sampled_logp, mask, mode="token_truncate", clip_max=3.0,
                    clip_min=0.0):
    """The correction for a sampler that is not exactly the trainer (vLLM, or bf16 incremental
    decoding): tokens drawn from π_sampler, not π_old, weigh w = π_old(y_t) / π_sampler(y_t).
    (N, T) log-probs and mask -> (N, T) weights (token modes) or (N, 1) (sequence modes: Π_t w_t);
    exactly 1 where the two agree. token_truncate: w clipped to [C_min, C_max] (TIS; Yao et al.
    2025, https://fengyao.notion.site/off-policy-rl; TRL's vllm_importance_sampling_correction);
    token_mask: 0 outside it (MIS; IcePop, arXiv:2510.18855, https://arxiv.org/abs/2510.18855);
    sequence_*: the same on the completion's ratio (Liu et al. 2025, "When speed kills stability:
    demystifying RL collapse from the training-inference mismatch", yingru.notion.site)."""
    log_w = (old_logp - sampled_logp) * mask
    if mode.startswith("sequence"):
        log_w = log_w.sum(1, keepdim=True)
    w = torch.exp(log_w)
    if mode.endswith("truncate"):
        return w.clamp(clip_min, clip_max)
    return w.masked_fill((w < clip_min) | (w > clip_max), 0.0)


# --------------------------------------------------------------------------------------------------
# Reward-model scores
def sequence_scores(model, input_ids, attention_mask, prefix=None):
    """(B,) scalar scores of an AutoModelForSequenceClassification with one label, read at each
    row's last real token as the attention mask says, whatever the padding side. transformers' own
    pooling finds the last token that is not the pad id, which misreads rows when pad == EOS or the
    padding is on the left (TRL #3750, #2778). With prefix = (prefix_ids (U, P) left-padded,
    prefix_mask, index (B,)), row i of input_ids (right-padded, at least one token) continues prefix
    index[i], which goes through the model once, as in shared_prefix_logits."""
    T, model = input_ids.shape[1], unwrap(model)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # ids that ignore left padding
    mask, kv = attention_mask, {}
    if prefix is not None:
        from transformers import DynamicCache
        prefix_ids, prefix_mask, index = prefix
        cache = DynamicCache(config=model.config)
        kv = {cache_kwarg(model): cache}
        model.base_model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True,
                         position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0), **kv)
        cache.batch_select_indices(index)  # U prefixes -> B rows
        positions, mask = (positions + prefix_mask.sum(-1)[index, None],
                           torch.cat([prefix_mask[index], mask], 1))
    hidden = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                              use_cache=bool(kv), **kv).last_hidden_state
    last = (attention_mask * torch.arange(T, device=input_ids.device)).argmax(-1)  # (B,)
    head = model.score if hasattr(model, "score") else model.classifier
    return head(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


@torch.no_grad()
def score_responses(model, tok, prompts, responses, rt, batch_size=16):
    """Reward-model scores of (prompt, response) pairs, batched: prompts are message lists,
    responses strings. This is how ppo.py and grpo.py call a model trained by reward_model.py.
    Returns a (N,) fp32 tensor on the CPU."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tok(tok.apply_chat_template(p + [{"role": "assistant", "content": r}],
                                           tokenize=False), add_special_tokens=False)["input_ids"]
               for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size])]
        x, mask = pad(ids, tok.pad_token_id)
        with rt.autocast():
            out.append(sequence_scores(model, x.to(rt.device), mask.to(rt.device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)
