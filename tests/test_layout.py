"""The layout the README promises: no import cycle among the project's modules, and common.py small."""
import ast
import os

from conftest import ROOT

MODULES = {"common", "tasks", "sft", "reward_model", "dpo", "grpo", "ppo", "opd", "plumbing.errors",
           "plumbing.args", "plumbing.models", "plumbing.data", "plumbing.formats", "plumbing.runs"}


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
