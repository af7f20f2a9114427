"""The environment: the built-in tasks, the prompt the policy sees, the answers, the grader and the
rewards.

Everything the RL scripts are rewarded by is here: the tasks and their held-out splits, the
instruction appended to a question (BOX_INSTRUCTION, so that an answer can be graded), the ground
truth of a row, the grader, the built-in rewards (accuracy and format, used by grpo.py and ppo.py
alike), the calling of users' reward functions with the keywords TRL passes them, and the greedy
evaluation of held-out answers.

Procedurally generated arithmetic, in TRL's conversational formats, unlimited and seeded, each with
a held-out tenth of all problems that training never sees:

    arithmetic              two-digit + and -, one-digit x two-digit, with worked answers
                            (SFT demonstrations)
    arithmetic_hard         harder kinds the demonstrations never show: three-digit +, -,
                            one-digit x three-digit, and two-step problems (a + b - c, a x b + c),
                            each with the same kind of worked answer
    arithmetic_mixed        `arithmetic` with half the demonstrations answering without the working:
                            a model SFT-trained on it answers both ways, and the short way is mostly
                            wrong
    arithmetic_preferences  `arithmetic` as preference pairs: the worked answer against a plausible
                            wrong one
    arithmetic_tools        `arithmetic_hard`'s problems with the calculator (tools.py; grpo.py
                            --tools calculator): half the demonstrations call it and answer with
                            its result, half answer at once (mostly wrong, when a model does it)

Splits: "train"; "test", the held-out problems; "reworded", the same held-out problems asked in
wordings that "train" never uses ("What is the sum of 23 and 45?" for "What is 23 + 45?"), which
measures whether what was learned carries over to an unseen phrasing.

The grader reads the last \\boxed{} of a completion and compares it with the answer as an exact
number (or, with --grader math_verify, also as mathematics by the math-verify library). The rewards
follow DeepSeek-R1's rule rewards (Guo et al. 2025, §2.2.2, https://arxiv.org/abs/2501.12948):
accuracy, 1 if the last \\boxed{} equals the answer, and format, 1 if there is a \\boxed{} answer at
all.
"""
import collections
import importlib.util
import math
import random
import re
import zlib
from fractions import Fraction
from types import SimpleNamespace

import torch

import common
from plumbing.errors import Timeout, UserError
from plumbing.runs import load_function, time_limit
from plumbing.formats import as_messages

BOX_INSTRUCTION = "Put the final answer in \\boxed{}."
SPLITS = ("train", "test", "reworded")
TEMPLATES = ["What is {q}?", "Compute {q}.", "Calculate {q}.", "Work out {q}."]
REWORDED = {  # one list per kind, as long as TEMPLATES, so a reworded problem i is test problem i
    "+": ["What is the sum of {a} and {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?",
          "Find the total of {a} and {b}."],
    "-": ["What is {a} minus {b}?", "Subtract {b} from {a}.",
          "How much is left when {b} is taken from {a}?",
          "Find the difference between {a} and {b}."],
    "*": ["What is the product of {a} and {b}?", "Multiply {a} by {b}.",
          "How much is {a} times {b}?", "What do {a} groups of {b} make?"],
    "+-": ["Add {a} and {b}, then subtract {c}.", "What is {a} plus {b} minus {c}?",
           "Start from {a}, add {b} and take away {c}. What is left?",
           "Find the sum of {a} and {b}, minus {c}."],
    "*+": ["Multiply {a} by {b}, then add {c}.", "What is {a} times {b} plus {c}?",
           "Take {a} groups of {b} and {c} more. How many is that?",
           "Find the product of {a} and {b}, plus {c}."],
}


def eval_op(op, a, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def worked(op, a, b):
    """The steps of a op b that the demonstrations teach: split off the units, then recombine."""
    if op == "+":
        t = (a // 10 + b // 10) * 10
        return (f"{a} + {b} = {a // 10 * 10} + {b // 10 * 10} + {a % 10} + {b % 10} = {t} + "
                f"{a % 10 + b % 10} = {a + b}")
    if op == "-":
        return (f"{a} - {b} = {a} - {b // 10 * 10} - {b % 10} = {a - b // 10 * 10} - {b % 10} "
                f"= {a - b}")
    return (f"{a} * {b} = {a} * {b // 10 * 10} + {a} * {b % 10} = {a * (b // 10 * 10)} + "
            f"{a * (b % 10)} = {a * b}")


def arithmetic_problem(rng, hard=False, reworded=False):
    """One problem: prompt, worked answer ending in \\boxed{N}, the number N, and a key that
    identifies it. hard=False draws exactly the problems (and random numbers) of the original
    task."""
    if not hard:
        kind = rng.choice("+-*")
        if kind == "+":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
        elif kind == "-":
            a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        else:
            a, b = rng.randint(2, 9), rng.randint(10, 99)
        c = None
    else:
        kind = rng.choice(["+", "-", "*", "+-", "*+"])
        if kind == "+":
            a, b = rng.randint(100, 999), rng.randint(100, 999)
        elif kind == "-":
            a, b = sorted((rng.randint(100, 999), rng.randint(100, 999)), reverse=True)
        elif kind == "*":
            a, b = rng.randint(2, 9), rng.randint(100, 999)
        elif kind == "+-":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
        else:
            a, b = rng.randint(2, 9), rng.randint(10, 99)
        c = (rng.randint(10, min(99, a + b)) if kind == "+-"
             else rng.randint(10, 99) if kind == "*+" else None)
    if c is None:
        n, q, work = eval_op(kind, a, b), f"{a} {kind} {b}", worked(kind, a, b) + "."
    else:
        first = eval_op(kind[0], a, b)
        n, q = eval_op(kind[1], first, c), f"{a} {kind[0]} {b} {kind[1]} {c}"
        work = f"First, {worked(kind[0], a, b)}. Then {worked(kind[1], first, c)}."
    ask = rng.choice(REWORDED[kind] if reworded else TEMPLATES).format(q=q, a=a, b=b, c=c)
    return {"prompt": f"{ask} {BOX_INSTRUCTION}",
            "completion": f"{work} The answer is \\boxed{{{n}}}.", "answer": str(n), "key": q}


def is_heldout(key):
    return zlib.crc32(key.encode()) % 10 == 0  # a fixed 10% of problems never appear in training


class Arithmetic:
    """Unlimited seeded arithmetic problems in TRL's conversational prompt-completion format. "test"
    and "reworded" hold exactly the problems whose key hashes into the held-out tenth; "train" never
    contains one."""
    unlimited = True
    hard = False
    column_names = ["prompt", "completion", "answer"]

    def __init__(self, split="train", seed=0, size=10**9):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: the built-in tasks have {', '.join(SPLITS)}")
        self.split, self.seed, self.size = split, seed, size

    def __len__(self):
        return self.size

    def problem(self, i):
        split = "test" if self.split == "reworded" else self.split
        rng = random.Random(f"arithmetic{'_hard' if self.hard else ''}/{split}/{self.seed}/{i}")
        while True:
            p = arithmetic_problem(rng, self.hard, self.split == "reworded")
            if is_heldout(p["key"]) == (self.split != "train"):
                return p, rng

    def __getitem__(self, i):
        p, _ = self.problem(i)
        return {"prompt": [{"role": "user", "content": p["prompt"]}],
                "completion": [{"role": "assistant", "content": p["completion"]}],
                "answer": p["answer"]}


class ArithmeticHard(Arithmetic):
    hard = True


class ArithmeticMixed(Arithmetic):
    """The problems of `arithmetic`, but half the demonstrations give the answer without the working
    ("The answer is \\boxed{56}."), as in SFT data of mixed quality. A model trained on them answers
    both ways; the worked way is right far more often, which a verifier can teach and imitation
    cannot."""

    def __getitem__(self, i):
        row = super().__getitem__(i)
        if random.Random(f"mixed/{self.split}/{self.seed}/{i}").random() < 0.5:
            row["completion"] = [{"role": "assistant",
                                  "content": f"The answer is \\boxed{{{row['answer']}}}."}]
        return row


def wrong_completion(p, rng):
    """A plausible wrong answer: the same working with a slip in the last step, or the right number
    without a box."""
    n, text = p["answer"], p["completion"]
    if rng.random() < 0.25:
        return text.replace(f"\\boxed{{{n}}}", n)
    wrong = str(int(n) + rng.choice([-10, -2, -1, 1, 2, 10]))
    head, _, _ = text.rpartition(f"= {n}.")
    return f"{head}= {wrong}. The answer is \\boxed{{{wrong}}}."


class ArithmeticPreferences(Arithmetic):
    """The arithmetic task as preference pairs (TRL's explicit-prompt format): chosen is the correct
    worked answer, rejected a plausible wrong one."""
    column_names = ["prompt", "chosen", "rejected", "answer"]

    def __getitem__(self, i):
        p, rng = self.problem(i)
        return {"prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["completion"]}],
                "rejected": [{"role": "assistant", "content": wrong_completion(p, rng)}],
                "answer": p["answer"]}


class ArithmeticTools(Arithmetic):
    """The problems of `arithmetic_hard`, with the calculator tool (tools.calculator) described to
    the model: a `tools` column with its JSON schema, which sft.py describes as grpo.py --tools
    calculator does. As in `arithmetic_mixed`, half the demonstrations answer at once ("The answer
    is \\boxed{N}."), and half ask the calculator for the whole expression and answer with its
    result, in TRL's conversational tool format (an assistant turn with `tool_calls`, the `tool`
    turn with the result, the answer). A model trained on them calls the tool on some problems
    only; the calls are right, the answers at once mostly wrong, which a verifier can teach and
    imitation cannot. The prompt is the problem alone."""
    hard = True
    column_names = ["prompt", "completion", "answer", "tools"]

    def __getitem__(self, i):
        import tools
        p, _ = self.problem(i)
        answer = [{"role": "assistant", "content": f"The answer is \\boxed{{{p['answer']}}}."}]
        if random.Random(f"tools/{self.split}/{self.seed}/{i}").random() < 0.5:
            q = p["key"]  # the expression, "a + b - c"
            call = {"type": "function",
                    "function": {"name": "calculator", "arguments": {"expression": q}}}
            answer = [{"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "name": "calculator", "content": tools.calculator(q)},
                      *answer]
        return {"prompt": [{"role": "user", "content": p["prompt"]}], "completion": answer,
                "answer": p["answer"], "tools": [tools.calculator_schema()]}


BUILTIN_TASKS = {"arithmetic": Arithmetic, "arithmetic_hard": ArithmeticHard,
                 "arithmetic_mixed": ArithmeticMixed,
                 "arithmetic_preferences": ArithmeticPreferences,
                 "arithmetic_tools": ArithmeticTools}


# --------------------------------------------------------------------------------------------------
# The prompt the policy sees: the row's question, with the instruction the grader needs
def rl_prompt(row):
    """The prompt messages of a row for sampling: a `prompt` (TRL) or `question` (GSM8K) column, or
    a `messages` conversation up to its last assistant turn. A plain-string question gets
    BOX_INSTRUCTION appended unless it already mentions \\boxed, so that answers can be graded."""
    if "prompt" in row or "question" in row:
        column = "prompt" if "prompt" in row else "question"
        x = row[column]
        if isinstance(x, str) and "boxed" not in x:
            x = f"{x.strip()} {BOX_INSTRUCTION}"
        return as_messages(x, "user", column)
    if "messages" in row:
        msgs = as_messages(row["messages"], "user", "messages")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if msgs:
            return msgs
    raise UserError(f"columns found: {sorted(row)}; expected a `prompt` or `question` column "
                    "(or `messages` ending in a user turn)")


# --------------------------------------------------------------------------------------------------
# The grader
def last_boxed(text):
    """Content of the last \\boxed{...} in text (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def _number(s):
    """'1,234' '$5' '-3.0' '\\frac{1}{2}' '3/4' '12 dollars' '50\\%' -> an exact Fraction, or None
    if s is not a number (after dropping $, thousands separators, units in words or \\text{}, and a
    leading 'x =')."""
    s = (s.replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
         .replace("\u2212", "-"))
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{[^{}]*\}", "", s)  # units: 5\text{ cm}
    s = _FRAC.sub(r"\1/\2", s).replace("\\left", "").replace("\\right", "")
    s = re.sub(r"^[a-zA-Z]\s*=", "", s.strip())  # x = 5
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)  # thousands separators
    s = re.sub(r"(\\%|%|\^\\circ|\^\{\\circ\}|°)", "", s)
    # 12 dollars, 5cm (not 2x)
    s = re.sub(r"(\s+[a-zA-Z]+)+\.?$|(?<=\d)[a-zA-Z]{2,}\.?$", "", s.strip())
    s = s.replace(" ", "").rstrip(".")
    m = re.fullmatch(r"\(?(-?(?:\d+\.?\d*|\.\d+))\)?(?:/\(?(-?(?:\d+\.?\d*|\.\d+))\)?)?", s)
    if not m:
        return None
    num, den = Fraction(m.group(1)), Fraction(m.group(2)) if m.group(2) else Fraction(1)
    return num / den if den else None


def normalize_answer(s):
    """A canonical form for comparing answers: numbers exactly (0.5 == 1/2 == \\frac{1}{2},
    1,000 == 1000.0, $18 == 18 dollars), anything else as the string without spaces, \\left/\\right
    and a final period."""
    s = str(s).strip()
    n = _number(s)
    if n is not None:
        return str(n)
    return re.sub(r"\s+|\\left|\\right|\\!", "", s).rstrip(".")


def reference_answer(row):
    """The ground truth of a row, or None: an `answer` column (GSM8K's worked answers end in
    "#### 42"), else the last \\boxed{} of a `solution` column (MATH)."""
    if row.get("answer") is not None:
        a = str(row["answer"])
        return a.rpartition("####")[2].strip() if "####" in a else a.strip()
    if row.get("solution") is not None:
        return last_boxed(str(row["solution"]))
    return None


GRADERS = ("exact", "math_verify")


def grade(text, answer, grader="exact"):
    """(has a \\boxed{} answer, that answer equals the ground truth) for one completion. grader:
    exact (numbers exactly, anything else as a normalised string) or math_verify: exact, or else
    equal as mathematics by the math-verify library (what TRL's accuracy_reward uses:
    \\dfrac{\\sqrt{3}}{2} = \\frac{\\sqrt{3}}{2}, \\pi/2 = \\frac{\\pi}{2}, x^2+1 = 1+x^2), an
    optional import."""
    box = last_boxed(text)
    if box is None:
        return False, False
    if normalize_answer(box) == normalize_answer(answer):
        return True, True
    if grader == "math_verify":
        from math_verify import parse, verify  # checked by check_grader before any work
        gold, pred = parse(f"${answer}$"), parse(f"${box}$")
        return True, bool(gold and pred and verify(gold, pred))
    return True, False


def check_grader(grader):
    """Refuse an unknown --grader, or math_verify where the library is not installed, before any
    work."""
    if grader not in GRADERS:
        raise UserError(f"--grader {grader}: choose {' or '.join(GRADERS)}")
    if grader == "math_verify" and importlib.util.find_spec("math_verify") is None:
        raise UserError("--grader math_verify needs the math-verify library: "
                        "pip install math-verify")


# --------------------------------------------------------------------------------------------------
# Rewards: the built-in rules, and users' functions called as TRL calls them
def accuracy_reward(completions, answer, grader="exact", **kw):
    """1 for a completion whose last \\boxed{} equals the answer, else 0 (and 0 without an
    answer)."""
    return [float(grade(c, a, grader)[1]) if a is not None else 0.0
            for c, a in zip(completions, answer)]


def format_reward(completions, **kw):
    """1 for a completion with a \\boxed{} answer, right or wrong, else 0."""
    return [float(last_boxed(c) is not None) for c in completions]


BUILTIN_REWARDS = {"accuracy": accuracy_reward, "format": format_reward}


def reward_functions(spec, weights_spec):
    """--reward_funcs 'accuracy,format,rules.py:fn' and --reward_weights
    -> [(name, function, weight)]."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    funcs = []
    for name in names:
        if name in BUILTIN_REWARDS:
            funcs.append(BUILTIN_REWARDS[name])
            continue
        funcs.append(load_function(name, f"--reward_funcs {name}: not a built-in reward "
                                         f"({', '.join(BUILTIN_REWARDS)}) nor"))
    if weights_spec:
        try:
            weights = [float(w) for w in weights_spec.split(",")]
        except ValueError:
            raise UserError(f"--reward_weights {weights_spec}: "
                            "give numbers separated by commas") from None
        if len(weights) != len(names):
            raise UserError(f"--reward_weights has {len(weights)} numbers for "
                            f"{len(names)} --reward_funcs")
    else:
        weights = [0.2 if n == "format" else 1.0 for n in names]  # λ_fmt = 0.2
    return [(n.rpartition(":")[2], f, w) for n, f, w in zip(names, funcs, weights)]


def reward_kwargs(rows, prompts, completions, completion_ids, step, max_steps, metrics, columns,
                  messages=None):
    """The keywords TRL's GRPOTrainer calls a reward function with, for n completions of the dataset
    rows `rows` (one row per completion): `prompts` as the dataset holds them (its `prompt` or
    `question` column; the messages each completion was sampled from for a `messages` row),
    `completions` as strings, or as [{"role": "assistant", "content": text}] where the prompt is a
    list of messages (for tool episodes, `messages`: their assistant and tool messages),
    `completion_ids`, every other column of the dataset (`answer`, `solution`,
    ...) as a list of n values (None where a row lacks it), `trainer_state` (global_step: the steps
    done, max_steps), and the hooks `log_metric(name, value)` and `log_extra(column, values)`, which
    append to metrics[name] and columns[column]."""
    raw = [r["prompt"] if "prompt" in r else r.get("question", p) for r, p in zip(rows, prompts)]
    completions = messages or [c if isinstance(x, str) else [{"role": "assistant", "content": c}]
                               for x, c in zip(raw, completions)]
    names = dict.fromkeys(k for r in rows for k in r
                          if k not in ("prompt", "completion", "completion_ids"))
    return {"prompts": raw, "completions": completions, "completion_ids": completion_ids,
            **{k: [r.get(k) for r in rows] for k in names},
            "trainer_state": SimpleNamespace(global_step=step, max_steps=max_steps),
            "log_metric": lambda name, value: metrics.setdefault(name, []).append(float(value)),
            "log_extra": lambda column, values: columns.setdefault(column, []).extend(values)}


ALL_NONE = collections.Counter()  # by function name: the steps it returned None for everything
TIMEOUTS = collections.Counter()  # by function name: the calls that ran past --reward_timeout


def call_reward(fn, name, n, timeout=0, /, **kw):  # (/: a dataset column may be called `name`)
    """Rewards of n completions from one function, called with the keywords kw, and how many of them
    it failed on. Any real number is a reward (int, float, bool, numpy or one-element torch values);
    None means "does not apply to this completion" and scores 0 (TRL sums the rewards of a
    completion over functions ignoring None). A nan or inf scores 0 and is counted. If the batch
    call raises, each completion is scored alone, and one that still fails scores 0 and is counted.
    Anything but a list (or tuple, array) of n values, or a function that fails on every
    completion, stops the run with one line. A call that runs past `timeout` seconds (0: no limit)
    is stopped, and its completions score 0, counted as failures (a hung batch call is not
    retried: it would hang n times).
    Keywords that are lists of n values are cut to one value for the one-completion calls."""
    def number(v):
        if v is None:
            return 0.0
        v = float(v)  # a TypeError or ValueError for anything that is not a real number
        if not math.isfinite(v):
            raise ValueError(f"returned {v}")
        return v

    def values_of(out, count):  # a list (or tuple, array, tensor) of count values, or refused
        try:
            length = None if isinstance(out, (str, bytes, dict)) else len(out)
        except TypeError:  # a number, a generator, a 0-d tensor...
            length = None
        if length is None:
            raise UserError(f"reward function {name} returned a {type(out).__name__}, not a list "
                            "of one value per completion")
        if length != count:
            raise UserError(f"reward function {name} returned {len(out)} values for {count} "
                            "completions")
        return list(out)
    def timed_call(**kw):
        with time_limit(timeout, f"reward function {name}"):
            return fn(**kw)

    def timed_out():
        TIMEOUTS[name] += 1
        print(f"warning: reward function {name} ran past --reward_timeout {timeout:g} s: its "
              "completions score 0, counted as failures", flush=True)
    values = None
    try:
        out, raised = timed_call(**kw), False
    except Timeout:
        timed_out()
        return [0.0] * n, n
    except Exception:
        raised = True
    if not raised:
        out = values_of(out, n)
        try:  # a nan or inf among them is an error of that completion, not retried
            finite = [v is None or math.isfinite(float(v)) for v in out]
            values = [number(v) if ok else 0.0 for v, ok in zip(out, finite)]
            failed, nones = finite.count(False), [v is None for v in out]
        except (TypeError, ValueError):
            pass
    if values is None:  # the batch call raised, or returned something that is not a number
        values, errors, nones = [], [], []
        for i in range(n):
            try:
                one = values_of(timed_call(**{k: v[i : i + 1] if isinstance(v, list) and len(v) == n
                                              else v for k, v in kw.items()}), 1)[0]
                values.append(number(one))
                nones.append(one is None)
            except UserError:
                raise
            except (Exception, Timeout) as e:
                if isinstance(e, Timeout):
                    timed_out()
                values.append(0.0)
                errors.append(e)
                nones.append(False)
        if len(errors) == n and not any(isinstance(e, Timeout) for e in errors):
            raise UserError(f"reward function {name} failed on every completion of a step, the "
                            f"first with {type(errors[0]).__name__}: {errors[0]}")
        failed = len(errors)
    if n and all(nones):  # TRL warns too: such a step trains on zeros from this function
        if not ALL_NONE[name]:
            print(f"warning: reward function {name} returned None for every completion of a "
                  "step: they score 0 (counted in rewards/<name>/all_none)", flush=True)
        ALL_NONE[name] += 1
    return values, failed



class Rewards:
    """The rewards of completions: one column per rule function (funcs: [(name, function, weight)],
    built-in or a user's) and, with reward_model = (model, tokenizer), one for its score
    (common.score_responses). The reward of a completion is Σ_k w_k r_k:
    rewards(...) @ rewards.weights. What users' functions log with log_metric collects in .logged
    until the caller takes it."""

    def __init__(self, funcs, grader="exact", reward_model=None, reward_model_weight=1.0,
                 name="--reward_model", timeout=0):
        self.funcs, self.grader, self.rm, self.rm_name = funcs, grader, reward_model, name
        self.timeout = timeout  # seconds a call of a user's function may take (call_reward)
        self.names = [n for n, _, _ in funcs] + (["reward_model"] if reward_model else [])
        weights = [w for _, _, w in funcs] + ([reward_model_weight] if reward_model else [])
        self.weights = torch.tensor(weights)
        self.logged = {}

    def __call__(self, rows, prompts, completions, completion_ids, answers, step, max_steps, rt,
                 messages=None):
        """Score n completions; rows, prompts (message lists) and answers: one per completion;
        messages: for tool episodes, each one's assistant and tool messages, which users' functions
        get as `completions` (as TRL passes them; the built-in rules and a reward model read the
        completion texts). Returns the (n, K) rewards, how many of them a function failed on
        (scored 0: call_reward), and the columns users' functions added with log_extra ({name: n
        values})."""
        n, extra = len(completions), {}
        builtin = {"completions": completions, "answer": answers, "grader": self.grader}
        if any(fn not in BUILTIN_REWARDS.values() for _, fn, _ in self.funcs):  # TRL's keywords
            user = reward_kwargs(rows, prompts, completions, completion_ids, step, max_steps,
                                 self.logged, extra, messages)
        columns, failed = [], 0
        for name, fn, _ in self.funcs:
            before = ALL_NONE[name], TIMEOUTS[name]
            if fn in BUILTIN_REWARDS.values():
                r, f = call_reward(fn, name, n, **builtin)
            else:
                r, f = call_reward(fn, name, n, self.timeout, **user)
            columns.append(r)
            failed += f
            for counter, what, b in ((ALL_NONE, "all_none", before[0]),
                                     (TIMEOUTS, "timeouts", before[1])):
                if counter[name] > b:
                    self.logged.setdefault(f"rewards/{name}/{what}", []).append(counter[name] - b)
        if self.rm is not None:
            scores = common.score_responses(*self.rm, prompts, completions, rt)
            if not torch.isfinite(scores).all():
                raise UserError(f"{self.rm_name} scored a completion nan or inf; check that model")
            columns.append(scores.tolist())
        extra = {k: v for k, v in extra.items() if len(v) == n}
        return torch.tensor(columns, dtype=torch.float32).reshape(len(columns), n).T, failed, extra

# --------------------------------------------------------------------------------------------------
# Held-out evaluation: greedy answers, graded
def evaluate_answers(model, tok, prompts, answers, rt, max_new_tokens=128, batch_size=32,
                     grader="exact", toolbox=None, max_tool_calls=0):
    """Greedy answers to held-out prompts (message lists) with known answers: {"eval/boxed": share
    with a \\boxed{}, "eval/accuracy": share correct by tasks.grade}. With toolbox (tools.Tools)
    greedy episodes (tools.episodes), graded on what the policy wrote, and "eval/tool_calls", the
    calls per problem. Under DDP each rank answers its share; the counts are summed."""
    mine = list(zip(prompts, answers))[rt.rank :: rt.world_size]
    calls = 0
    if toolbox is None:
        _, texts = common.generate(model, tok, [p for p, _ in mine], rt, max_new_tokens,
                                   batch_size)
    else:
        import tools
        kw = toolbox.template_kwargs(tok)
        ids = common.encode_prompts(tok, [toolbox.prompt(tok, p)[0] for p, _ in mine], **kw)
        episodes = tools.episodes(common.generate_ids, model, tok, ids, toolbox, kw, rt,
                                  max_new_tokens, batch_size, 0.0, 1.0, max_tool_calls)
        texts, calls = [e["text"] for e in episodes], sum(e["calls"] for e in episodes)
    graded = [grade(t, a, grader) for t, (_, a) in zip(texts, mine)]
    boxed, correct, calls = common.all_reduce(
        torch.tensor([float(sum(g[0] for g in graded)), float(sum(g[1] for g in graded)),
                      float(calls)]), rt).tolist()
    out = {"eval/boxed": boxed / len(prompts), "eval/accuracy": correct / len(prompts)}
    if toolbox is not None:
        out["eval/tool_calls"] = calls / len(prompts)
    return out, texts
