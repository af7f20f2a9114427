"""Row formats: what a row of a dataset may look like, in TRL's formats.

Conversational rows (`messages`), prompt-completion rows, and preference pairs with an explicit
prompt (`prompt`, `chosen`, `rejected`) or an implicit one (`chosen` and `rejected` whole
conversations, or HH-RLHF transcripts, that share a prefix). Message contents may be strings or
OpenAI-style text parts. Tokenization with assistant-only labels is common.tokenize_conversation;
here it is applied to pairs.
"""
import re
from contextlib import contextmanager

from common import tokenize_conversation
from plumbing.errors import UserError

ROLES = ("system", "developer", "user", "assistant", "tool")


def as_messages(x, role, column=None):
    """A TRL field that is either a plain string or a list of messages -> a list of {role, content}
    messages. Content may be a string or OpenAI-style text parts ([{"type": "text", "text": ...}]);
    tool_calls and the other keys of a message are kept for templates that render them. column:
    the field's name, for the error."""
    if isinstance(x, (str, int, float)):  # a CSV reader turns "42" into a number
        return [{"role": role, "content": str(x)}]
    if not (isinstance(x, list) and x and all(isinstance(m, dict) and "role" in m for m in x)):
        where = f"`{column}`" if column else "a field"
        if x is None:  # the datasets library fills a column that a row lacks with null
            raise UserError(f"{where} is null (a file that mixes row formats gets the other "
                            "format's columns as null: give every row the same columns)")
        raise UserError(f"{where} holds {str(x)[:80]!r}; expected a string or a list of "
                        "{role, content} messages")
    return [message(m) for m in x]


@contextmanager
def at_row(i, name=None):
    """Name the row (and the dataset) in the UserError of reading it."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{name + ', ' if name else ''}row {i}: {e}") from None


def message(m):
    if m["role"] not in ROLES:
        raise UserError(f"a message has the role {m['role']!r}; the roles are {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI-style content parts
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise UserError(f"a message of role {m['role']} has content parts that are not text; "
                            'only {"type": "text"} parts are supported')
        content = "".join(p.get("text") or "" for p in content)
    if content is None and not m.get("tool_calls"):
        raise UserError(f"a message of role {m['role']} has no content (null or missing)")
    return {**{k: v for k, v in m.items() if v is not None}, "content": content or ""}


def conversation(row):
    """A row in TRL's conversational (`messages`) or prompt-completion format -> one list of
    messages."""
    if "label" in row and "completion" in row:
        raise UserError("the rows have a `label` column: unpaired preference data (KTO), not "
                        "demonstrations; sft.py would train on every completion, label false "
                        "included. Keep the desirable rows and drop the column")
    if "messages" in row and "prompt" in row and "completion" in row:  # columns of both formats
        null = [f"`{k}`" for k in ("messages", "prompt", "completion") if row[k] is None]
        raise UserError(f"the rows mix two formats (`messages`, and `prompt` with `completion`): "
                        f"here {' and '.join(null) or 'none of them'} is null; give every row the "
                        "same columns")
    if "messages" in row:
        return as_messages(row["messages"], "user", "messages")
    if "prompt" in row and "completion" in row:
        return (as_messages(row["prompt"], "user", "prompt")
                + as_messages(row["completion"], "assistant", "completion"))
    raise UserError(f"columns found: {sorted(row)}; expected `messages` "
                    f"(a list of {{role, content}}) or `prompt` and `completion`")


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_transcript(text):
    """An Anthropic HH-RLHF transcript "\n\nHuman: ...\n\nAssistant: ..." -> a list of messages."""
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3 or parts[0].strip():
        raise UserError(f"expected a Human/Assistant transcript, got {text[:80]!r}")
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(parts[1::2], parts[2::2])]


def preference_pair(row):
    """A preference row in TRL's explicit-prompt (`prompt`, `chosen`, `rejected`) or implicit-prompt
    (`chosen` and `rejected` whole conversations, or HH-RLHF transcripts, that share a prefix)
    format -> (prompt, chosen, rejected) as message lists. With an implicit prompt the prompt is the
    longest common prefix of messages."""
    if "chosen" not in row or "rejected" not in row:
        raise UserError(f"columns found: {sorted(row)}; expected `chosen` and `rejected`, with or "
                        "without `prompt` (strings or lists of {role, content})")
    if "prompt" in row:
        prompt, chosen, rejected = (as_messages(row[k], "user" if k == "prompt" else "assistant",
                                                k) for k in ("prompt", "chosen", "rejected"))
        n = len(prompt)
        # chosen/rejected repeat the prompt (UltraFeedback)
        if chosen[:n] == prompt and rejected[:n] == prompt:
            chosen, rejected = chosen[n:], rejected[n:]
        return prompt, chosen, rejected
    chosen, rejected = (parse_transcript(row[k]) if isinstance(row[k], str)
                        else as_messages(row[k], "assistant", k) for k in ("chosen", "rejected"))
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def tokenize_pair(tok, prompt, chosen, rejected, max_length):
    """(ids, labels) of prompt+chosen and of prompt+rejected, labels on the responses only; None for
    a pair that is longer than max_length (dropped, not cut, as TRL's reward trainer does) or has an
    empty response."""
    out = []
    for response in (chosen, rejected):
        x = tokenize_conversation(tok, prompt + response, 10**9, train_from=len(prompt))
        if x is None or len(x[0]) > max_length:
            return None
        out.append(x)
    return out


def tokenize_preferences(ds, tok, max_length, name, rt=None, keep_index=False):
    """Tokenize every pair of a finite preference dataset; pairs whose chosen and rejected are
    identical, that are too long or that have no response token are dropped and counted in a
    one-line summary. With keep_index, each kept pair comes as (row index, pair)."""
    kept, same, bad = [], 0, 0
    for i in range(len(ds)):
        with at_row(i, name):
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
        print(f"data: {name}: {len(kept)} pairs kept, {same} dropped with chosen == rejected, "
              f"{bad} dropped longer than --max_length {max_length} or with no response token",
              flush=True)
    if not kept:
        raise UserError(f"no preference pair of {name} is left after filtering; check the data or "
                        "raise --max_length")
    return kept
