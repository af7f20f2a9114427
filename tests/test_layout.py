"""The layout the README promises: no import cycle among the project's modules, and common.py small."""
import ast
import os

from conftest import ROOT

MODULES = {"common", "tasks", "tools", "sft", "reward_model", "dpo", "grpo", "ppo", "opd", "plumbing.errors",
           "plumbing.args", "plumbing.models", "plumbing.data", "plumbing.formats", "plumbing.runs",
           "plumbing.engine"}


def imports(module):
    """The project modules that `module` imports anywhere in its file (at the top or inside a function)."""
    tree = ast.parse(open(os.path.join(ROOT, module.replace(".", "/") + ".py")).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out & MODULES


def test_no_import_cycle():
    graph = {m: imports(m) for m in MODULES}
    done, path = set(), []

    def visit(m):
        assert m not in path, " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for n in graph[m]:
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(MODULES):
        visit(m)
    # the run machinery never reaches back into a method script
    assert not any(graph[m] & {"sft", "reward_model", "dpo", "grpo", "ppo", "opd"} for m in MODULES)


def test_a_cycle_is_found(monkeypatch):
    import test_layout
    monkeypatch.setattr(test_layout, "imports", lambda m: {"common": {"tasks"}, "tasks": {"common"}}.get(m, set()))
    try:
        test_layout.test_no_import_cycle()
    except AssertionError as e:
        assert "common -> tasks -> common" in str(e) or "tasks -> common -> tasks" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")


def test_common_is_small():
    assert len(open(os.path.join(ROOT, "common.py")).read().splitlines()) <= 500


# issue 24's targets: a method's main() reads as its algorithm's steps, short enough to read at once
MAIN_LINES = {"grpo": 130, "ppo": 130, "sft": 110, "reward_model": 110, "dpo": 110, "opd": 110}


def main_lines(script):
    tree = ast.parse(open(os.path.join(ROOT, script + ".py")).read())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    return main.end_lineno - main.lineno + 1


def test_each_main_is_short():
    long = {s: main_lines(s) for s, limit in MAIN_LINES.items() if main_lines(s) > limit}
    assert not long, f"main() over its limit {MAIN_LINES}: {long}"


def test_each_script_has_its_own_arguments_first():
    """The fields a script declares itself come before those it inherits from plumbing.args.Shared
    (in --help too: args._help_order), and it re-declares a shared field only to change it."""
    from dataclasses import fields

    import importlib

    from plumbing.args import Shared, _help_order
    shared = {f.name: f for f in fields(Shared)}
    for script in MAIN_LINES:
        cls = importlib.import_module(script).Args
        assert issubclass(cls, Shared), script
        names = [f.name for f in fields(_help_order(cls))]
        own = [n for n in names if n not in shared]
        assert names[: len(own)] == own, script
        declared = cls.__dict__.get("__annotations__", {})  # this class's own, not inherited
        for f in fields(cls):  # a re-declared shared field changes its default or its help
            if f.name in declared and f.name in shared and f.default == shared[f.name].default:
                assert f.metadata.get("help") not in (None, shared[f.name].metadata["help"]), \
                    f"{script}.Args.{f.name} repeats Shared's field"
