"""Tools for multi-turn episodes (grpo.py --tools): what the policy may call, how a call is written
and parsed, how it runs, and the tokens that go back to the policy.

A tool is a plain Python function with type hints and a docstring with an `Args:` section, as TRL
takes them (`GRPOTrainer(tools=[fn])`); its JSON schema comes from
transformers.utils.get_json_schema. A chat template that renders tools (Qwen2.5's, Llama 3.1's)
gets the schemas through its `tools` argument; otherwise (SmolLM2's template, for one) they are
written into the system prompt (TOOLS_PROMPT). The policy calls a tool by writing, in the Hermes
format of Qwen2.5 and many others,

    <tool_call>{"name": "calculator", "arguments": {"expression": "123 * 4"}}</tool_call>

and ending its turn. Each call's result, or its error as text (an unknown tool, malformed JSON,
arguments that do not match the schema, a tool that raises or runs past --tool_timeout: as TRL
does, never a crash of the run), goes back as a `tool` message, and the policy writes on
(`episodes`).

Token in, token out: the policy's tokens are kept as sampled, never decoded and re-tokenized; the
environment's tokens (what the template writes after the policy's end of turn: the tool messages
and the next assistant header) are appended as ids and marked 0 in the episode's policy mask, so
that no loss, KL, entropy or length normaliser counts them (the layout of TRL's tool_mask).

Tools run in the trainer's process. What they may do is the user's code, as with reward functions:
passed as code, run as code. Built in: calculator(expression), which evaluates +, -, x, / and
parentheses with a small parser (never eval).
"""
import json
import re
from fractions import Fraction

import common
from plumbing.errors import Timeout, UserError
from plumbing.runs import load_function, time_limit

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TOOLS_PROMPT = (
    "You can call these tools. To call one, write\n"
    '<tool_call>{{"name": <tool name>, "arguments": <its arguments, a JSON object>}}</tool_call>\n'
    "and end your turn; its result comes back in the next message.\n"
    "Tools (JSON schemas):\n{schemas}")


# --------------------------------------------------------------------------------------------------
# The built-in tool
def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression: numbers, +, -, * (or x), / and parentheses.

    Args:
        expression: The expression, for example "(123 + 456) * 7".
    """
    value = _Arithmetic(expression).parse()
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6g}"


class _Arithmetic:
    """A recursive-descent parser of  expr := term (('+' | '-') term)*,  term := factor (('*' |
    '/') factor)*,  factor := ('+' | '-') factor | number | '(' expr ')', in exact fractions."""
    TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\S))")
    SYMBOLS = {"x": "*", "×": "*", "÷": "/", "*": "*", "/": "/", "+": "+", "-": "-", "−": "-",
               "(": "(", ")": ")"}

    def __init__(self, text):
        if len(text) > 200:
            raise ValueError("the expression is longer than 200 characters")
        self.tokens = []
        for m in self.TOKEN.finditer(text):
            number, symbol = m.groups()
            if symbol is not None and symbol not in self.SYMBOLS:
                raise ValueError(f"unexpected {symbol!r} at position {m.start(2)}")
            self.tokens.append(Fraction(number) if number else self.SYMBOLS[symbol])
        self.at, self.depth = 0, 0

    def peek(self):
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self):
        self.at += 1
        return self.tokens[self.at - 1]

    def parse(self):
        if not self.tokens:
            raise ValueError("the expression is empty")
        value = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r} after a complete expression")
        return value

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self):
        value = self.factor()
        while self.peek() in ("*", "/"):
            op, right = self.take(), self.factor()
            if op == "/" and right == 0:
                raise ValueError("division by zero")
            value = value * right if op == "*" else value / right
        return value

    def factor(self):
        t = self.peek()
        if t is None:
            raise ValueError("the expression ends too early")
        self.take()
        if t in ("+", "-"):
            self.depth += 1
            if self.depth > 50:
                raise ValueError("too deeply nested")
            value = self.factor()
            self.depth -= 1
            return value if t == "+" else -value
        if t == "(":
            self.depth += 1
            if self.depth > 50:
                raise ValueError("too deeply nested")
            value = self.expr()
            if self.peek() != ")":
                raise ValueError("a '(' is not closed")
            self.take()
            self.depth -= 1
            return value
        if isinstance(t, Fraction):
            return t
        raise ValueError(f"unexpected {t!r}")


BUILTIN_TOOLS = {"calculator": calculator}


def calculator_schema():
    """The calculator's JSON schema (transformers.utils.get_json_schema), made once."""
    global _CALCULATOR_SCHEMA
    if _CALCULATOR_SCHEMA is None:
        from transformers.utils import get_json_schema
        _CALCULATOR_SCHEMA = get_json_schema(calculator)
    return _CALCULATOR_SCHEMA


_CALCULATOR_SCHEMA = None


# --------------------------------------------------------------------------------------------------
# Loading, describing, parsing and running tools
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
              "object": dict, "null": type(None)}


class Tools:
    """The tools of --tools: "calculator" (built in) or "path/to/file.py:fn1,fn2" (a bare name after
    a file is another function of that file), comma-separated. Each call of one runs with a limit of
    `timeout` seconds (0: none)."""

    def __init__(self, spec, timeout=10.0):
        from transformers.utils import get_json_schema
        self.functions, self.timeout, path = {}, timeout, None
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            if ":" in item:
                path, _, item = item.rpartition(":")
            fn = (load_function(f"{path}:{item}", f"--tools {spec}: give")
                  if path else BUILTIN_TOOLS.get(item))
            if fn is None:
                raise UserError(f"--tools {item}: not a built-in tool ({', '.join(BUILTIN_TOOLS)});"
                                " give path/to/file.py:function for your own")
            self.functions[fn.__name__] = fn
        if not self.functions:
            raise UserError("--tools is empty: give calculator or path/to/file.py:function")
        self.schemas = []
        for name, fn in self.functions.items():
            try:
                self.schemas.append(get_json_schema(fn))
            except Exception as e:  # no type hints, no docstring, an undocumented argument
                raise UserError(f"--tools: {name} has no JSON schema ({e}); a tool needs type "
                                "hints and a docstring with an Args: section, as TRL's tools do"
                                ) from None

    def prompt(self, tok, messages):
        """messages with the tools described, and the keywords for tok.apply_chat_template
        (describe)."""
        return describe(tok, messages, self.schemas)

    def template_kwargs(self, tok):
        """{"tools": the schemas} if the chat template renders tools, else {}."""
        return describe(tok, [], self.schemas)[1]

    def call(self, text):
        """Run one call, the text between <tool_call> and </tool_call> -> (the tool message, whether
        it failed). The result of a failed call is its error, as text, for the model to read."""
        name = "unknown"
        try:
            try:
                call = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"the tool call is not valid JSON ({e.msg})") from None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ValueError('a tool call is {"name": ..., "arguments": {...}}')
            name, arguments = call["name"], call.get("arguments", {})
            if name not in self.functions:
                raise ValueError(f"no tool named {name!r}; the tools are "
                                 f"{', '.join(self.functions)}")
            self.check(name, arguments)
            with time_limit(self.timeout, f"tool {name}"):
                result = self.functions[name](**arguments)
            return {"role": "tool", "name": name, "content": str(result)}, False
        except Timeout:
            return {"role": "tool", "name": name,
                    "content": f"error: {name} ran past {self.timeout:g} s and was stopped"}, True
        except Exception as e:  # the model reads what went wrong, as in TRL
            return {"role": "tool", "name": name, "content": f"error: {e}"}, True

    def check(self, name, arguments):
        """Refuse arguments that do not match the tool's JSON schema (ValueError)."""
        params = next(s for s in self.schemas if s["function"]["name"] == name)["function"]
        params = params.get("parameters", {})
        if not isinstance(arguments, dict):
            raise ValueError(f"the arguments of {name} must be a JSON object")
        props = params.get("properties", {})
        unknown = [k for k in arguments if k not in props]
        missing = [k for k in params.get("required", []) if k not in arguments]
        if unknown or missing:
            raise ValueError(f"{name} takes {', '.join(props) or 'no arguments'}; "
                             + (f"unknown: {', '.join(unknown)}" if unknown else
                                f"missing: {', '.join(missing)}"))
        for k, v in arguments.items():
            types = props[k].get("type")
            types = [types] if isinstance(types, str) else types or []
            allowed = tuple(JSON_TYPES.get(n, object) for n in types)
            wrong_bool = isinstance(v, bool) and "boolean" not in types
            if types and (not isinstance(v, allowed) or wrong_bool):
                raise ValueError(f"{name}: {k} must be {' or '.join(types)}, got "
                                 f"{type(v).__name__}")


def renders(tok, what):
    """Whether tok's chat template renders `tools` (the schemas it is given) or `tool_calls` (an
    assistant message's), found by rendering a probe with and without them."""
    key = (tok.chat_template, what)
    if key not in _RENDERS:
        user = [{"role": "user", "content": "hi"}]
        if what == "tools":
            with_it = tok.apply_chat_template(user, tools=[PROBE_SCHEMA], tokenize=False)
            without = tok.apply_chat_template(user, tokenize=False)
        else:
            call = {"type": "function", "function": {"name": "probe_tool", "arguments": {}}}
            reply = {"role": "assistant", "content": "ok"}
            with_it = tok.apply_chat_template(user + [{**reply, "tool_calls": [call]}],
                                              tokenize=False)
            without = tok.apply_chat_template(user + [reply], tokenize=False)
        _RENDERS[key] = with_it != without
    return _RENDERS[key]


_RENDERS = {}
PROBE_SCHEMA = {"type": "function", "function": {"name": "probe_tool", "description": "A probe.",
                                                 "parameters": {"type": "object",
                                                                "properties": {}}}}


def describe(tok, messages, schemas):
    """messages with the tools (their JSON schemas) described, and the keywords for
    tok.apply_chat_template: the schemas as `tools` where the template renders them, else
    TOOLS_PROMPT in the system message (added, or put before the one there is)."""
    if renders(tok, "tools"):
        return messages, {"tools": schemas}
    text = TOOLS_PROMPT.format(schemas="\n".join(json.dumps(s) for s in schemas))
    if messages and messages[0]["role"] == "system":
        system = {**messages[0], "content": f"{text}\n\n{messages[0]['content']}"}
        return [system] + messages[1:], {}
    return [{"role": "system", "content": text}] + messages, {}


def calls_as_text(tok, messages):
    """TRL's assistant messages with `tool_calls`, for a template that does not render them: each
    call written into the content in the form the policy writes it (TOOL_CALL), so that sft.py
    trains what grpo.py parses."""
    if not any(m.get("tool_calls") for m in messages) or renders(tok, "tool_calls"):
        return messages
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [c.get("function", c) for c in m["tool_calls"]]
            text = "".join("<tool_call>" + json.dumps({"name": c["name"],
                                                       "arguments": c.get("arguments", {})})
                           + "</tool_call>" for c in calls)
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = (m.get("content") or "") + text
        out.append(m)
    return out


def env_ids(tok, tool_messages, end_of_turn, template_kwargs):
    """The environment's token ids after the policy's end-of-turn token: what the chat template
    writes after an assistant turn closed by it (a newline, say), the tool messages, and the header
    of the next assistant turn. Found by rendering a stand-in conversation with and without them
    (TRL does the same); tokenized on their own, never together with the policy's tokens."""
    stand_in = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    before = tok.apply_chat_template(stand_in, tokenize=False, **template_kwargs)
    after = tok.apply_chat_template(stand_in + tool_messages, add_generation_prompt=True,
                                    tokenize=False, **template_kwargs)
    end = tok.decode([end_of_turn])
    cut = before.rfind(end)
    if cut < 0 or not after.startswith(before[: cut + len(end)]):
        raise UserError("the chat template does not close an assistant turn with "
                        f"{end!r} or renders it differently once a tool message follows; "
                        "pass another with --chat_template")
    return tok(after[cut + len(end):], add_special_tokens=False)["input_ids"]


def episodes(sample, model, tok, prompt_ids, tools, template_kwargs, rt, max_new_tokens,
             batch_size, temperature, top_p, max_calls):
    """[algorithm] Multi-turn rollouts: the policy writes; a turn that ends with the end-of-turn
    token and holds <tool_call>s has each call run (Tools.call) and the tool messages appended as
    environment tokens (env_ids), and the policy writes on, until it answers without a call, has
    called tools in `max_calls` turns (TRL's max_tool_calling_iterations), or the episode reaches
    max_new_tokens (policy and environment tokens together; tool results that would pass it are
    not appended, as in TRL). All active episodes sample together, one turn at a time, with
    `sample` (common.generate_ids or the vLLM engine).

    Returns one dict per prompt: "ids" (every token after the prompt, as sampled or appended),
    "policy" (1 for the policy's tokens, 0 for the environment's), "logps" (the sampled log-prob
    of each policy token, 0 for the others), "messages" (the episode as assistant and tool
    messages, as TRL passes it to reward functions), "text" (what the policy wrote, its turns
    joined), "calls", "failures", "results" ((tool name, failed) per call) and "turns"."""
    out = [{"ids": [], "policy": [], "logps": [], "messages": [], "calls": 0, "failures": 0,
            "results": [], "turns": 0, "called_turns": 0} for _ in prompt_ids]
    end_of_turn = tok.stop_ids[0]
    active = list(range(len(prompt_ids)))
    while active:
        room = [max_new_tokens - len(out[i]["ids"]) for i in active]
        ids, logps = sample(model, tok, [list(prompt_ids[i]) + out[i]["ids"] for i in active], rt,
                            max(room), batch_size, temperature, top_p, return_logprobs=True)
        going = []
        for i, y, lp, r in zip(active, ids, logps, room):
            e, y, lp = out[i], y[:r], lp[:r]
            e["ids"] += y
            e["policy"] += [1] * len(y)
            e["logps"] += lp
            e["turns"] += 1
            text = tok.decode(y, skip_special_tokens=True)
            e["messages"].append({"role": "assistant", "content": text})
            calls = TOOL_CALL.findall(text)
            if not calls or not y or y[-1] != end_of_turn or e["called_turns"] >= max_calls:
                continue
            results = [tools.call(c.strip()) for c in calls]
            e["calls"] += len(results)
            e["failures"] += sum(failed for _, failed in results)
            e["results"] += [(m["name"], failed) for m, failed in results]
            e["called_turns"] += 1
            env = env_ids(tok, [m for m, _ in results], end_of_turn, template_kwargs)
            if len(e["ids"]) + len(env) >= max_new_tokens:
                continue  # no room left to answer: the episode ends here
            e["ids"] += env
            e["policy"] += [0] * len(env)
            e["logps"] += [0.0] * len(env)
            e["messages"] += [m for m, _ in results]
            going.append(i)
        active = going
    for e in out:
        e["text"] = "\n".join(m["content"] for m in e["messages"] if m["role"] == "assistant")
    return out


def metrics(episodes, rt):
    """A step's tool metrics over its episodes on every rank, TRL's names where it has them:
    tools/call_frequency (calls per episode), tools/failure_frequency (failed calls per call), and
    tools/episodes_with_call, tools/turns (turns per episode). A tool whose every call of the step
    failed gets one line."""
    by_tool = {}
    for e in episodes:
        for name, failed in e["results"]:
            calls, failures = by_tool.get(name, (0, 0))
            by_tool[name] = calls + 1, failures + failed
    for name, (calls, failures) in by_tool.items():
        if failures == calls:
            rt.print(f"warning: every call of tool {name} failed this step ({calls} calls); see "
                     "the tool results in completions.jsonl")
    s = common.all_reduce_sums({"episodes": len(episodes),
                                "calls": sum(e["calls"] for e in episodes),
                                "failures": sum(e["failures"] for e in episodes),
                                "with_call": sum(e["calls"] > 0 for e in episodes),
                                "turns": sum(e["turns"] for e in episodes)}, rt)
    n = max(s["episodes"], 1.0)
    return {"tools/call_frequency": s["calls"] / n,
            "tools/failure_frequency": s["failures"] / max(s["calls"], 1.0),
            "tools/episodes_with_call": s["with_call"] / n, "tools/turns": s["turns"] / n}
