"""Datasets: where the rows come from and what a row may look like.

A --dataset is a built-in task of tasks.py, a local .jsonl/.json/.parquet/.csv file, a saved dataset folder or a Hub
id, or a comma-separated mixture of them with --dataset_weights. A row is read in TRL's formats: conversational
(`messages`), prompt-completion, preference pairs with an explicit or implicit prompt (HH-RLHF transcripts too),
and prompt-only rows for the RL scripts (`prompt` or `question`, with an `answer` or `solution` for graded rewards).
A conversation becomes tokens with labels on the assistant's tokens only (tokenize_conversation), for any chat
template.
"""
import json
import os
import random
import re
from types import SimpleNamespace

import torch

import common as C
import models as M
import tasks
from runs import UserError
from tasks import BOX_INSTRUCTION, BUILTIN_TASKS, reference_answer


# ----------------------------------------------------------------------------------------------------------------
# Sources: built-in tasks, local files, Hub ids, mixtures
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_data(spec, split="train", config=None, seed=0, flag="--dataset_split"):
    """One dataset: a built-in task name, a local .jsonl/.json/.parquet/.csv, a saved dataset folder, or a Hub id
    (with split/config). flag: the argument that chose the split, named when the dataset has no such split."""
    if spec in BUILTIN_TASKS:
        if split not in tasks.SPLITS:
            raise UserError(f"{spec} has the splits {', '.join(tasks.SPLITS)}, not {split!r}: choose one with {flag}")
        return BUILTIN_TASKS[spec](split, seed)
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot read becomes our one-line error
    path = os.path.expanduser(spec)
    ext = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower()  # datasets reads .jsonl.gz too
    try:
        if os.path.isfile(path):
            if os.path.getsize(path) == 0:
                raise UserError(f"--dataset {spec} is empty")
            if ext not in LOCAL_FORMATS:
                raise UserError(f"--dataset {spec}: unknown file type {ext!r}; use .jsonl, .json, .parquet or .csv")
            if LOCAL_FORMATS[ext] in ("json", "csv"):
                _check_text(spec, path, lines=False)  # text that is not UTF-8 would fail row by row, later
            ds = datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, split="train")
        elif os.path.isfile(os.path.join(path, "dataset_dict.json")):  # save_to_disk of several splits
            ds = datasets.load_from_disk(path)
            if split not in ds:
                raise _no_split(spec, split, list(ds), flag)
            ds = ds[split]
        elif os.path.isdir(path):
            ds = datasets.load_from_disk(path) if os.path.exists(os.path.join(path, "dataset_info.json")) \
                else datasets.load_dataset(path, config, split=split)
        elif ext in LOCAL_FORMATS or M.looks_like_path(spec):
            raise UserError(f"--dataset {spec}: no such file")
        else:
            ds = datasets.load_dataset(spec, config, split=split)
    except UserError:
        raise
    except Exception as e:
        if os.path.isfile(path) and LOCAL_FORMATS.get(ext) == "json":
            _check_text(spec, path, lines=True)
        if "split" in str(e):  # e.g. ultrachat_200k has train_sft, test_sft, ... and no train
            try:
                names = datasets.get_dataset_split_names(spec, config)
            except Exception:
                names = None
            if names and split not in names:
                raise _no_split(spec, split, names, flag) from None
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--dataset {spec}: cannot load it ({msg}); built-in tasks: {', '.join(BUILTIN_TASKS)}") from None
    if len(ds) == 0:
        raise UserError(f"--dataset {spec} is empty")
    return ds


def _no_split(spec, split, names, flag):
    return UserError(f"--dataset {spec} has no split {split!r}; its splits are {', '.join(names)}: choose one with "
                     f"{flag}")


def _check_text(spec, path, lines):
    """Refuse a text file that is not UTF-8 (the datasets library reads it, then fails on every row); with lines,
    say which line of a .jsonl file is not JSON."""
    import gzip
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if lines and line.strip() and not path.endswith((".json", ".json.gz")):
                    json.loads(line)
    except UnicodeDecodeError as e:
        raise UserError(f"--dataset {spec} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None
    except ValueError as e:
        raise UserError(f"--dataset {spec}: line {n} is not valid JSON ({e})") from None


def load_splits(args, n_heldout):
    """The training sources of --dataset (one or a mixture) and the held-out rows: the built-in task's own
    disjoint test split, else --eval_split of the first dataset, else --eval_size rows held out of it."""
    mixture = parse_mixture(args.dataset, args.dataset_weights)
    raw = [load_data(s, args.dataset_split, args.dataset_config, args.seed) for s, _ in mixture]
    if getattr(raw[0], "unlimited", False):
        test = load_data(mixture[0][0], args.eval_split or "test", seed=args.seed, flag="--eval_split")
        heldout = [test[i] for i in range(n_heldout)]
    elif args.eval_split:
        if os.path.isfile(os.path.expanduser(mixture[0][0])):
            raise UserError("--eval_split names a split of a Hub dataset; a local file has one split: use --eval_size")
        heldout = load_data(mixture[0][0], args.eval_split, args.dataset_config, flag="--eval_split")
    else:
        n = args.eval_size
        if len(raw[0]) < 2 * n:  # a small file: hold out a tenth of it rather than most of it
            n = len(raw[0]) // 10
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"notice: {mixture[0][0]} has {len(raw[0])} rows: holding out {n} (a tenth), not --eval_size "
                      f"{args.eval_size}", flush=True)
        perm = torch.randperm(len(raw[0]), generator=torch.Generator().manual_seed(args.seed)).tolist()
        raw[0], heldout = raw[0].select(perm[n:]), raw[0].select(perm[:n])
    return mixture, raw, heldout


def load_prompts(args, tok, rt, need_answers=None, reads_per_step=1):
    """For RL scripts: the prompt sources of --dataset (Prompts), the held-out (prompt, answer) pairs that
    evaluate_answers grades, and the prompt stream: step k reads order[k * batch_size : (k + 1) * batch_size].
    need_answers names what needs a ground truth in every training row, if anything does; reads_per_step: how many
    batches of prompts a step may read at most."""
    mixture, raw, heldout = load_splits(args, args.eval_size)
    sources = [Prompts(s, ds, tok, args.max_prompt_length, need_answers) for (s, _), ds in zip(mixture, raw)]
    for (s, _), src in zip(mixture, sources):
        if src.dropped:
            rt.print(f"data: {s}: {src.dropped} prompts dropped, longer than --max_prompt_length {args.max_prompt_length}")
        if src.unanswered:
            rt.print(f"data: {s}: {src.unanswered} prompts dropped, without the ground truth {need_answers} needs")
    graded = [(rl_prompt(r), reference_answer(r)) for r in (heldout[i] for i in range(min(args.eval_size, len(heldout))))]
    order = mixture_order([len(s) for s in sources], [w for _, w in mixture],
                          args.max_steps * args.batch_size * reads_per_step, args.seed,
                          unlimited={i for i, s in enumerate(sources) if s.unlimited})
    return sources, [(p, a) for p, a in graded if a is not None], order


def parse_mixture(datasets_arg, weights_arg):
    """'a,b' and '0.7,0.3' -> [('a', 0.7), ('b', 0.3)], weights normalised to sum to 1 (the w_s of a mixture)."""
    specs = [s.strip() for s in datasets_arg.split(",") if s.strip()]
    if not specs:
        raise UserError("--dataset is empty")
    if not weights_arg:
        return [(s, 1.0 / len(specs)) for s in specs]
    try:
        w = [float(x) for x in weights_arg.split(",")]
    except ValueError:
        raise UserError(f"--dataset_weights {weights_arg}: give numbers separated by commas") from None
    if len(w) != len(specs) or any(x < 0 for x in w) or sum(w) <= 0:
        raise UserError(f"--dataset_weights needs {len(specs)} non-negative numbers, one per dataset, not all zero")
    return [(s, x / sum(w)) for s, x in zip(specs, w)]


def mixture_order(sizes, weights, n, seed, unlimited=()):
    """The first n (source, row) pairs of the training stream: each example comes from source s with probability
    w_s, and each finite source is read in a fresh random order every epoch. The stream depends only on the seed
    (a longer stream starts with the shorter one), so a run resumed at step k reads from position k * batch_size."""
    rng = random.Random(seed)
    order, pos, perm = [], [0] * len(sizes), {}
    for _ in range(n):
        s = rng.choices(range(len(sizes)), weights)[0]
        if s in unlimited:  # generated tasks are random already and never run out
            order.append((s, pos[s]))
        else:
            epoch, i = divmod(pos[s], sizes[s])
            if i == 0:
                perm[s] = list(range(sizes[s]))
                random.Random(f"{seed}/{s}/{epoch}").shuffle(perm[s])
            order.append((s, perm[s][i]))
        pos[s] += 1
    return order


class Prompts:
    """(prompt messages, prompt token ids, ground truth) of a dataset. Finite datasets are read up front; prompts over
    max_prompt_length tokens, and those without a ground truth when need_answers says a reward needs one, are
    dropped and counted. Generated tasks are read when needed."""

    def __init__(self, name, ds, tok, max_prompt_length, need_answers=None):
        self.ds, self.tok, self.max_len = ds, tok, max_prompt_length
        self.unlimited = getattr(ds, "unlimited", False)
        rl_prompt(ds[0])  # checks the columns: a clear error before any work
        read = [] if self.unlimited else [(i, self._read(i)) for i in range(len(ds))]
        self.unanswered = sum(x is not None and x[2] is None for _, x in read) if need_answers else 0
        if self.unanswered == len(read) > 0 or (self.unlimited and need_answers and self[0][2] is None):
            raise UserError(f"{name} has no `answer` (or `solution`) column for {need_answers}")
        read = [(i, x) for i, x in read if x is not None and (x[2] is not None or not need_answers)]
        self.rows = [i for i, _ in read]  # the dataset row of each kept prompt
        self.items = None if self.unlimited else [x for _, x in read]
        self.dropped = 0 if self.unlimited else len(ds) - len(self.items) - self.unanswered
        if self.items == []:
            raise UserError(f"every prompt of {name} is longer than --max_prompt_length {max_prompt_length}")

    def _read(self, i):
        row = self.ds[i]
        msgs = rl_prompt(row)
        ids = C.encode_prompts(self.tok, [msgs])[0]
        return (msgs, ids, reference_answer(row)) if len(ids) <= self.max_len else None

    def __len__(self):
        return len(self.ds) if self.unlimited else len(self.items)

    def __getitem__(self, i):
        return self._read(i) if self.unlimited else self.items[i]

    def row(self, i):
        """The whole dataset row of prompt i (for its other columns)."""
        return self.ds[i if self.unlimited else self.rows[i]]



# ----------------------------------------------------------------------------------------------------------------
# Row formats: messages, conversations, preference pairs, prompts
ROLES = ("system", "developer", "user", "assistant", "tool")


def as_messages(x, role):
    """A TRL field that is either a plain string or a list of messages -> a list of {role, content} messages.
    Content may be a string or OpenAI-style text parts ([{"type": "text", "text": ...}]); tool_calls and the
    other keys of a message are kept for templates that render them."""
    if isinstance(x, (str, int, float)):  # a CSV reader turns "42" into a number
        return [{"role": role, "content": str(x)}]
    if not (isinstance(x, list) and x and all(isinstance(m, dict) and "role" in m for m in x)):
        raise UserError(f"expected a string or a list of {{role, content}} messages, got {str(x)[:80]!r}")
    return [message(m) for m in x]


def message(m):
    if m["role"] not in ROLES:
        raise UserError(f"a message has the role {m['role']!r}; the roles are {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI-style content parts
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise UserError(f"a message of role {m['role']} has content parts that are not text; only "
                            '{"type": "text"} parts are supported')
        content = "".join(p.get("text") or "" for p in content)
    if content is None and not m.get("tool_calls"):
        raise UserError(f"a message of role {m['role']} has no content (null or missing)")
    return {**{k: v for k, v in m.items() if v is not None}, "content": content or ""}


def conversation(row):
    """A row in TRL's conversational (`messages`) or prompt-completion format -> one list of messages."""
    if "label" in row and "completion" in row:
        raise UserError("the rows have a `label` column: unpaired preference data (KTO), not demonstrations; sft.py "
                        "would train on every completion, label false included. Keep the desirable rows and drop "
                        "the column")
    if "messages" in row:
        return as_messages(row["messages"], "user")
    if "prompt" in row and "completion" in row:
        return as_messages(row["prompt"], "user") + as_messages(row["completion"], "assistant")
    raise UserError(f"columns found: {sorted(row)}; expected `messages` (a list of {{role, content}}) "
                    "or `prompt` and `completion`")


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_transcript(text):
    """An Anthropic HH-RLHF transcript "\n\nHuman: ...\n\nAssistant: ..." -> a list of messages."""
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3 or parts[0].strip():
        raise UserError(f"expected a Human/Assistant transcript, got {text[:80]!r}")
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def preference_pair(row):
    """A preference row in TRL's explicit-prompt (`prompt`, `chosen`, `rejected`) or implicit-prompt (`chosen` and
    `rejected` whole conversations, or HH-RLHF transcripts, that share a prefix) format -> (prompt, chosen,
    rejected) as message lists. With an implicit prompt the prompt is the longest common prefix of messages."""
    if "chosen" not in row or "rejected" not in row:
        raise UserError(f"columns found: {sorted(row)}; expected `chosen` and `rejected`, with or without `prompt` "
                        "(strings or lists of {role, content})")
    if "prompt" in row:
        prompt, chosen, rejected = (as_messages(row[k], "user" if k == "prompt" else "assistant")
                                    for k in ("prompt", "chosen", "rejected"))
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt:  # chosen/rejected repeat the prompt (UltraFeedback)
            chosen, rejected = chosen[n:], rejected[n:]
        return prompt, chosen, rejected
    chosen, rejected = (parse_transcript(x) if isinstance(x, str) else as_messages(x, "assistant")
                        for x in (row["chosen"], row["rejected"]))
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def tokenize_pair(tok, prompt, chosen, rejected, max_length):
    """(ids, labels) of prompt+chosen and of prompt+rejected, labels on the responses only; None for a pair that
    is longer than max_length (dropped, not cut, as TRL's reward trainer does) or has an empty response."""
    out = []
    for response in (chosen, rejected):
        x = tokenize_conversation(tok, prompt + response, 10**9, train_from=len(prompt))
        if x is None or len(x[0]) > max_length:
            return None
        out.append(x)
    return out


def tokenize_preferences(ds, tok, max_length, name, rt=None, keep_index=False):
    """Tokenize every pair of a finite preference dataset; pairs whose chosen and rejected are identical, that
    are too long or that have no response token are dropped and counted in a one-line summary. With keep_index,
    each kept pair comes as (row index, pair)."""
    kept, same, bad = [], 0, 0
    for i in range(len(ds)):
        p, c, r = preference_pair(ds[i])
        if c == r:
            same += 1
            continue
        x = tokenize_pair(tok, p, c, r, max_length)
        if x is None:
            bad += 1
        else:
            kept.append((i, x) if keep_index else x)
    if rt is None or rt.is_main:
        print(f"data: {name}: {len(kept)} pairs kept, {same} dropped with chosen == rejected, {bad} dropped longer "
              f"than --max_length {max_length} or with no response token", flush=True)
    if not kept:
        raise UserError(f"no preference pair of {name} is left after filtering; check the data or raise --max_length")
    return kept


def rl_prompt(row):
    """The prompt messages of a row for sampling: a `prompt` (TRL) or `question` (GSM8K) column, or a `messages`
    conversation up to its last assistant turn. A plain-string question gets BOX_INSTRUCTION appended unless it
    already mentions \\boxed, so that answers can be graded."""
    if "prompt" in row or "question" in row:
        x = row["prompt"] if "prompt" in row else row["question"]
        if isinstance(x, str) and "boxed" not in x:
            x = f"{x.strip()} {BOX_INSTRUCTION}"
        return as_messages(x, "user")
    if "messages" in row:
        msgs = as_messages(row["messages"], "user")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if msgs:
            return msgs
    raise UserError(f"columns found: {sorted(row)}; expected a `prompt` or `question` column "
                    "(or `messages` ending in a user turn)")


def reward_kwargs(rows, prompts, completions, completion_ids, step, max_steps, metrics, columns):
    """The keywords TRL's GRPOTrainer calls a reward function with, for n completions of the dataset rows `rows` (one
    row per completion): `prompts` as the dataset holds them (its `prompt` or `question` column; the messages each
    completion was sampled from for a `messages` row), `completions` as strings, or as [{"role": "assistant",
    "content": text}] where the prompt is a list of messages, `completion_ids`, every other column of the dataset
    (`answer`, `solution`, ...) as a list of n values (None where a row lacks it), `trainer_state` (global_step: the
    steps done, max_steps), and the hooks `log_metric(name, value)` and `log_extra(column, values)`, which append to
    metrics[name] and columns[column]."""
    raw = [r["prompt"] if "prompt" in r else r.get("question", p) for r, p in zip(rows, prompts)]
    completions = [c if isinstance(x, str) else [{"role": "assistant", "content": c}] for x, c in zip(raw, completions)]
    names = dict.fromkeys(k for r in rows for k in r if k not in ("prompt", "completion", "completion_ids"))
    return {"prompts": raw, "completions": completions, "completion_ids": completion_ids,
            **{k: [r.get(k) for r in rows] for k in names},
            "trainer_state": SimpleNamespace(global_step=step, max_steps=max_steps),
            "log_metric": lambda name, value: metrics.setdefault(name, []).append(float(value)),
            "log_extra": lambda column, values: columns.setdefault(column, []).extend(values)}


# ----------------------------------------------------------------------------------------------------------------
# Chat-template masking
MARKER = "\x00MARKER\x00"  # stands in for an assistant message's content to find where the content starts


def tokenize_conversation(tok, messages, max_length, train_from=0):
    """Tokens of a chat-templated conversation and their labels: the token id where the model is trained (every
    assistant content token and the assistant's end-of-turn token) and C.IGNORE_INDEX everywhere else (system, user
    and tool turns, assistant headers, template whitespace after end-of-turn).

    Works without `{% generation %}` markers: the assistant spans are found by rendering the conversation up to
    each assistant turn with and without it and comparing character offsets. Only assistant messages at index
    >= train_from are trained (preference pairs score their last response, not the assistant turns of the
    prompt). Returns (input_ids, labels) cut to max_length, or None when no trained token is left."""
    text = tok.apply_chat_template(messages, tokenize=False)
    marker = MARKER
    while marker in text:  # a marker that the conversation itself never contains
        marker += "\x00"
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        # Where the content starts: render the conversation up to this turn with a marker as its content.
        marked = tok.apply_chat_template(messages[:i] + [{"role": "assistant", "content": marker}], tokenize=False)
        start = marked.find(marker)
        turn = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if start < 0 or not text.startswith(turn) or turn[:start] != marked[:start]:
            raise UserError("the chat template renders earlier turns differently once later turns are added; "
                            "pass a prefix-consistent template with --chat_template")
        end = start + len(turn[start:].rstrip())  # the newline after <|im_end|> is formatting, not output
        spans.append((start, end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [C.IGNORE_INDEX] * len(ids)
    for j, (a, b) in enumerate(enc["offset_mapping"][: len(ids)]):
        if any(a < e and b > s for s, e in spans):  # the token overlaps an assistant span
            labels[j] = ids[j]
    if all(l == C.IGNORE_INDEX for l in labels):
        return None
    return ids, labels
