"""Datasets: where the rows come from.

A --dataset is a built-in task of tasks.py, a local .jsonl/.json/.parquet/.csv file, a saved dataset
folder or a Hub id, or a comma-separated mixture of them with --dataset_weights; the held-out rows
come from a built-in task's own test split, --eval_split, or --eval_size rows held out. The RL
scripts read prompts (tasks.rl_prompt: what the policy sees) in a seeded stream that a resumed run
continues. What a row may look like is formats.py.
"""
import json
import os
import random

import torch

import tasks
from common import encode_prompts
from plumbing.errors import UserError
from plumbing.formats import at_row
from plumbing.models import looks_like_path
from tasks import BUILTIN_TASKS, reference_answer, rl_prompt


# --------------------------------------------------------------------------------------------------
# Sources: built-in tasks, local files, Hub ids, mixtures
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_data(spec, split="train", config=None, seed=0, flag="--dataset_split"):
    """One dataset: a built-in task name, a local .jsonl/.json/.parquet/.csv, a saved dataset
    folder, or a Hub id (with split/config). flag: the argument that chose the split, named when the
    dataset has no such split."""
    if spec in BUILTIN_TASKS:
        if split not in tasks.SPLITS:
            raise UserError(f"{spec} has the splits {', '.join(tasks.SPLITS)}, not {split!r}: "
                            f"choose one with {flag}")
        return BUILTIN_TASKS[spec](split, seed)
    import datasets
    datasets.disable_progress_bars()
    # a file it cannot read becomes our one-line error
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    path = os.path.expanduser(spec)
    # datasets reads .jsonl.gz too
    ext = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower()
    try:
        if os.path.isfile(path):
            if os.path.getsize(path) == 0:
                raise UserError(f"--dataset {spec} is empty")
            if ext not in LOCAL_FORMATS:
                raise UserError(f"--dataset {spec}: unknown file type {ext!r}; "
                                "use .jsonl, .json, .parquet or .csv")
            if LOCAL_FORMATS[ext] in ("json", "csv"):
                # text that is not UTF-8 would fail row by row, later
                _check_text(spec, path, lines=False)
            ds = datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, split="train")
        elif os.path.isfile(os.path.join(path, "dataset_dict.json")):
            # save_to_disk of several splits
            ds = datasets.load_from_disk(path)
            if split not in ds:
                raise _no_split(spec, split, list(ds), flag)
            ds = ds[split]
        elif os.path.isdir(path):
            ds = (datasets.load_from_disk(path)
                  if os.path.exists(os.path.join(path, "dataset_info.json"))
                  else datasets.load_dataset(path, config, split=split))
        elif ext in LOCAL_FORMATS or looks_like_path(spec):
            raise UserError(f"--dataset {spec}: no such file")
        else:
            ds = datasets.load_dataset(spec, config, split=split)
    except UserError:
        raise
    except Exception as e:
        if os.path.isfile(path) and LOCAL_FORMATS.get(ext) == "json":
            _check_text(spec, path, lines=True)
        if "corresponds to no data" in str(e):  # a folder whose files for that split are empty
            raise UserError(f"--dataset {spec}: its split {split!r} has no rows (its files for it "
                            f"are empty); fill them or choose another split with {flag}") from None
        if "split" in str(e):  # e.g. ultrachat_200k has train_sft, test_sft, ... and no train
            try:
                names = datasets.get_dataset_split_names(spec, config)
            except Exception:
                names = None
            if names and split not in names:
                raise _no_split(spec, split, names, flag) from None
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--dataset {spec}: cannot load it ({msg}); "
                        f"built-in tasks: {', '.join(BUILTIN_TASKS)}") from None
    if len(ds) == 0:
        raise UserError(f"--dataset {spec} is empty")
    return ds


def _no_split(spec, split, names, flag):
    return UserError(f"--dataset {spec} has no split {split!r}; its splits are "
                     f"{', '.join(names)}: choose one with {flag}")


def _check_text(spec, path, lines):
    """Refuse a text file that is not UTF-8 (the datasets library reads it, then fails on every
    row); with lines, say which line of a .jsonl file is not JSON."""
    import gzip
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if lines and line.strip() and not path.endswith((".json", ".json.gz")):
                    json.loads(line)
    except UnicodeDecodeError as e:
        raise UserError(f"--dataset {spec} is not UTF-8 text ({e.reason}); "
                        "convert it to UTF-8") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"--dataset {spec} is not a whole gzip file ({e}); compress it with "
                        "gzip, or drop the .gz from its name if it is plain text") from None
    except ValueError as e:
        raise UserError(f"--dataset {spec}: line {n} is not valid JSON ({e})") from None


def load_splits(args, n_heldout):
    """The training sources of --dataset (one or a mixture) and the held-out rows: the built-in
    task's own disjoint test split, else --eval_split of the first dataset, else --eval_size rows
    held out of it."""
    mixture = parse_mixture(args.dataset, args.dataset_weights)
    raw = [load_data(s, args.dataset_split, args.dataset_config, args.seed) for s, _ in mixture]
    if getattr(raw[0], "unlimited", False):
        test = load_data(mixture[0][0], args.eval_split or "test", seed=args.seed,
                         flag="--eval_split")
        heldout = [test[i] for i in range(n_heldout)]
    elif args.eval_split:
        if os.path.isfile(os.path.expanduser(mixture[0][0])):
            raise UserError("--eval_split names a split of a Hub dataset; a local file has one "
                            "split: use --eval_size")
        heldout = load_data(mixture[0][0], args.eval_split, args.dataset_config,
                            flag="--eval_split")
    else:
        n = args.eval_size
        if len(raw[0]) < 2 * n:  # a small file: hold out a tenth of it rather than most of it
            n = len(raw[0]) // 10
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"notice: {mixture[0][0]} has {len(raw[0])} rows: holding out {n} "
                      f"(a tenth), not --eval_size {args.eval_size}", flush=True)
        perm = torch.randperm(len(raw[0]),
                              generator=torch.Generator().manual_seed(args.seed)).tolist()
        raw[0], heldout = raw[0].select(perm[n:]), raw[0].select(perm[:n])
    return mixture, raw, heldout


def load_prompts(args, tok, rt, need_answers=None, reads_per_step=1, tools=None):
    """For RL scripts: the prompt sources of --dataset (Prompts), the held-out (prompt, answer)
    pairs that evaluate_answers grades, and the prompt stream: step k reads
    order[k * batch_size : (k + 1) * batch_size]. need_answers names what needs a ground truth in
    every training row, if anything does; reads_per_step: how many batches of prompts a step may
    read at most; tools (tools.Tools) are described in every training prompt."""
    mixture, raw, heldout = load_splits(args, args.eval_size)
    sources = [Prompts(s, ds, tok, args.max_prompt_length, need_answers, tools)
               for (s, _), ds in zip(mixture, raw)]
    for (s, _), src in zip(mixture, sources):
        if src.dropped:
            rt.print(f"data: {s}: {src.dropped} prompts dropped, longer than --max_prompt_length "
                     f"{args.max_prompt_length}")
        if src.unanswered:
            rt.print(f"data: {s}: {src.unanswered} prompts dropped, without the ground truth "
                     f"{need_answers} needs")
    graded = [(rl_prompt(r), reference_answer(r))
              for r in (heldout[i] for i in range(min(args.eval_size, len(heldout))))]
    order = mixture_order([len(s) for s in sources], [w for _, w in mixture],
                          args.max_steps * args.batch_size * reads_per_step, args.seed,
                          unlimited={i for i, s in enumerate(sources) if s.unlimited})
    return sources, [(p, a) for p, a in graded if a is not None], order


def parse_mixture(datasets_arg, weights_arg):
    """'a,b' and '0.7,0.3' -> [('a', 0.7), ('b', 0.3)], weights normalised to sum to 1 (the w_s of a
    mixture)."""
    specs = [s.strip() for s in datasets_arg.split(",") if s.strip()]
    if not specs:
        raise UserError("--dataset is empty")
    if not weights_arg:
        return [(s, 1.0 / len(specs)) for s in specs]
    try:
        w = [float(x) for x in weights_arg.split(",")]
    except ValueError:
        raise UserError(f"--dataset_weights {weights_arg}: "
                        "give numbers separated by commas") from None
    if len(w) != len(specs) or any(x < 0 for x in w) or sum(w) <= 0:
        raise UserError(f"--dataset_weights needs {len(specs)} non-negative numbers, one per "
                        "dataset, not all zero")
    return [(s, x / sum(w)) for s, x in zip(specs, w)]


def mixture_order(sizes, weights, n, seed, unlimited=()):
    """The first n (source, row) pairs of the training stream: each example comes from source s with
    probability w_s, and each finite source is read in a fresh random order every epoch. The stream
    depends only on the seed (a longer stream starts with the shorter one), so a run resumed at step
    k reads from position k * batch_size."""
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
    """(prompt messages, prompt token ids, ground truth) of a dataset. Finite datasets are read up
    front; prompts over max_prompt_length tokens, and those without a ground truth when need_answers
    says a reward needs one, are dropped and counted. Generated tasks are read when needed."""

    def __init__(self, name, ds, tok, max_prompt_length, need_answers=None, tools=None):
        self.name, self.ds, self.tok, self.max_len = name, ds, tok, max_prompt_length
        self.tools = tools  # tools.Tools: described in each prompt
        self.unlimited = getattr(ds, "unlimited", False)
        with at_row(0, name):  # checks the columns: a clear error before any work
            rl_prompt(ds[0])
        read = [] if self.unlimited else [(i, self._read(i)) for i in range(len(ds))]
        self.unanswered = (sum(x is not None and x[2] is None for _, x in read) if need_answers
                           else 0)
        if (self.unanswered == len(read) > 0
                or (self.unlimited and need_answers and self[0][2] is None)):
            raise UserError(f"{name} has no `answer` (or `solution`) column for {need_answers}")
        read = [(i, x) for i, x in read if x is not None and (x[2] is not None or not need_answers)]
        self.rows = [i for i, _ in read]  # the dataset row of each kept prompt
        self.items = None if self.unlimited else [x for _, x in read]
        self.dropped = 0 if self.unlimited else len(ds) - len(self.items) - self.unanswered
        if self.items == []:
            raise UserError(f"every prompt of {name} is longer than --max_prompt_length "
                            f"{max_prompt_length}")

    def _read(self, i):
        row = self.ds[i]
        with at_row(i, self.name):
            msgs = rl_prompt(row)
        kw = {}
        if self.tools is not None:
            msgs, kw = self.tools.prompt(self.tok, msgs)
        ids = encode_prompts(self.tok, [msgs], **kw)[0]
        return (msgs, ids, reference_answer(row)) if len(ids) <= self.max_len else None

    def __len__(self):
        return len(self.ds) if self.unlimited else len(self.items)

    def __getitem__(self, i):
        return self._read(i) if self.unlimited else self.items[i]

    def row(self, i):
        """The whole dataset row of prompt i (for its other columns)."""
        return self.ds[i if self.unlimited else self.rows[i]]


def prompt_batch(sources, order, start, batch_size, rt):
    """This rank's share of the prompts at positions start .. start + batch_size of the stream
    (load_prompts): a list of (messages, token ids, ground truth, the whole dataset row)."""
    picked = order[start : start + batch_size][rt.rank :: rt.world_size]
    return [(*sources[s][i], sources[s].row(i)) for s, i in picked]
