"""Every code name docs/design.md names exists in the code.

The rule: take every inline `span` of docs/design.md outside fenced blocks. A span with a space, a quote, `<`,
`=` or any other character outside letters, digits, `_ . / -` is prose or a command and is not checked; what
remains (optionally followed by `(args)`) is a name, checked thus:
- `name(args)`, a signature: a function or class `name` (the last dotted part) is defined in htnet/ or search/,
  and every argument written (the part before `=`, without `*`; `...` skipped) is one of its parameters (a
  class: its __init__'s, or its fields).
- a name with `/` or a file name (`x.csv`, `x.py`, ...): the file exists in the repository, or the name occurs
  in the source.
- `htnet.x` / `search.x`: it imports (a module, or an attribute of one), or it occurs in the source (an MLflow
  tag such as `htnet.status`).
- any other name (a key, tag, metric, status, flag, artifact): it occurs in the source of htnet/ or search/ as
  a whole word (not inside a longer name).
"""
import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "design.md"
SPAN = re.compile(r"`([^`\n]+)`")
NAME = re.compile(r"^(-{0,2}[A-Za-z_][\w./-]*)(?:\((.*)\))?$")
FILE_SUFFIX = re.compile(r"\.(py|csv|json|yaml|md|png|tex|db|log)$")


def names(text):
    """The checked spans of `text`, in order, each once (fenced blocks left out)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return list(dict.fromkeys(s for s in SPAN.findall(prose) if NAME.match(s) and not NAME.match(s)[1].endswith(".")))


@cache
def sources():
    return {path: path.read_text() for package in ("htnet", "search") for path in sorted((REPO / package).rglob("*.py"))}


@cache
def all_source():
    return "\n".join(sources().values())


@cache
def definitions():
    """Function or class name -> [its parameter names, per definition]."""
    found = {}
    for text in sources().values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
                found.setdefault(node.name, []).append(set(params) - {"self", "cls"})
            elif isinstance(node, ast.ClassDef):
                init = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
                fields = {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
                params = {x.arg for x in init[0].args.args + init[0].args.kwonlyargs} - {"self"} if init else fields
                found.setdefault(node.name, []).append(params)
    return found


def occurs(name):
    return re.search(rf"(?<!\w){re.escape(name)}(?![\w-])", all_source()) is not None


def imports(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def problem(span):
    """None if `span` names something in the code, else why not."""
    name, args = NAME.match(span).groups()
    if args is not None:
        written = {a.split("=")[0].strip().lstrip("*") for a in args.split(",")} - {"", "..."}
        defined = definitions().get(name.rsplit(".", 1)[-1], [])
        if not defined:
            return f"no function or class {name!r} in htnet/ or search/"
        if not any(written <= params for params in defined):
            return f"{name}: no definition has the parameters {sorted(written)} (it has {defined})"
        return None
    if "/" in name or FILE_SUFFIX.search(name):
        return None if (REPO / name).exists() or occurs(name) else f"no file {name} and not in the source"
    if name.startswith(("htnet.", "search.")):
        return None if imports(name) or occurs(name) else f"{name} does not import and is not in the source"
    return None if occurs(name) else f"{name!r} does not occur in htnet/ or search/"


def test_the_doc_names_only_what_exists():
    found = names(DOC.read_text())
    assert len(found) > 150  # the extraction finds the doc's names
    assert {span: why for span in found if (why := problem(span))} == {}


@pytest.mark.parametrize("span", ["htnet.stauts", "trails.csv", "PruningOptunaSerch", "run_loso(confg)",
                                  "search.driver.runer", "prunned", "htnet_stauts", "search/spaces/dem.py",
                                  "--ray-storag", "tell(study, trial, valu)"])
def test_a_misspelled_name_is_caught(span):
    assert names(f"text `{span}` text") == [span]
    assert problem(span) is not None


def test_prose_and_fenced_blocks_are_not_checked():
    assert names("`python -m search run` `a=b` `<name>`\n```\n`nowhere_at_all`\n```\n`run_loso`") == ["run_loso"]
