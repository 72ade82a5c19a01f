"""The shape of the code, checked on every run: short functions, layers that point one way,
private Ray modules only behind a guard, a task contract every task keeps, and dependency pins
that agree with each other."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PACKAGES = ("lstm", "tune")
SCRIPTS = ("bench",)  # checked for function length and private Ray imports as well
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def scripts() -> dict[str, Path]:
    return {p.relative_to(REPO).as_posix(): p for folder in SCRIPTS for p in (REPO / folder).rglob("*.py")}


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at module level or inside functions)."""
    mods = modules()
    return {
        m: {n for node in ast.walk(parsed(p)) for n in imported_names(node) if n in mods and n != m}
        for m, p in mods.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_function_is_longer_than_a_screen():
    long = [
        (f"{m}.{node.name}", node.end_lineno - node.lineno + 1)
        for m, p in {**modules(), **scripts()}.items()
        for node in ast.walk(parsed(p))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_no_import_cycles_but_the_registrys_and_the_apis_lazy_imports():
    graph = import_graph()
    graph["lstm.task"].discard("lstm.tasks")  # get_task() imports the built-in tasks to register them
    graph["lstm"].discard("lstm.api")  # lstm.train & co. are imported on first use (PEP 562 __getattr__)
    graph["tune"].discard("tune.api")  # tune.search too
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_tasks_and_models_do_not_depend_on_the_loop_or_ray():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith(("lstm.tasks", "lstm.models", "lstm.data")):
            assert not deps & {"lstm.loop", "lstm.trainer", "lstm.step", "lstm.cluster", "lstm.cli"}, module
            source = modules()[module].read_text()
            assert not re.search(r"^\s*(import|from) ray\b", source, re.M), f"{module} imports ray"


def test_ptb_config_reads_without_torch():
    """PTB's config and presets import without torch or the PTB task (the tasks package imports no task)."""
    code = "import sys, lstm.tasks.ptb_config; print([m for m in ('torch', 'lstm.tasks.ptb') if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_task_declares_its_search_over_its_own_fields_and_a_display():
    from lstm import config as cfg
    from lstm.task import Display, Search, Task, get_task, register, task_names

    assert task_names() == ["char", "ptb", "rectangle"]
    for name in task_names():
        task = get_task(name)
        fields = cfg.scalar_fields(task.config_class)
        assert isinstance(task.search, Search) and isinstance(task.display, Display), name
        assert task.search.epochs_field in fields and task.search.mode in ("min", "max"), name
        assert set(task.search.space) | set(task.search.pbt_mutations) <= set(fields), name

    class NoDisplay(Task):
        name = "no-display"
        config_class = get_task("rectangle").config_class
        search = Search("epochs", "valid_loss")

    with pytest.raises(TypeError, match="NoDisplay does not set display"):
        register(NoDisplay)
    assert "no-display" not in task_names()


PRIVATE_RAY = re.compile(r"ray(\.\w+)*\._(private|internal)\b|ray\.experimental\b")


def in_try_bodies(tree: ast.AST) -> set[int]:
    return {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)}


def private_ray_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, enclosing function or '') of each import of a private Ray module."""
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if any(PRIVATE_RAY.match(n) for n in imported_names(node)):
            scope = parents.get(id(node))
            while scope is not None and not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
                scope = parents.get(id(scope))
            found.append((node.lineno, scope.name if scope is not None else ""))
    return found


def reach_calls_outside_try(tree: ast.Module) -> list[int]:
    """Lines calling a strict accessor (``reach_*``) outside the body of a ``try``."""
    guarded = in_try_bodies(tree)
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", "") or getattr(node.func, "attr", "")).startswith("reach_")
        and id(node) not in guarded
    ]


def test_private_ray_modules_are_reached_only_through_lstm_ray_private_behind_a_guard():
    """Private Ray modules are imported in lstm/ray_private.py alone, inside its strict
    accessors (``reach_*``), and the library calls those only inside a ``try`` that degrades to
    a warning (tests/test_ray_private.py calls them strictly)."""
    imports = {m: found for m, p in {**modules(), **scripts()}.items() if (found := private_ray_imports(parsed(p)))}
    assert set(imports) == {"lstm.ray_private"}
    assert {name for _, name in imports["lstm.ray_private"]} <= {
        name for name in dir(__import__("lstm.ray_private", fromlist=["x"])) if name.startswith("reach_")
    }
    unguarded = {m: lines for m, p in modules().items() if (lines := reach_calls_outside_try(parsed(p)))}
    assert unguarded == {}
    assert private_ray_imports(ast.parse("def f():\n  from ray._private.state import state")) == [(2, "f")]
    assert reach_calls_outside_try(ast.parse("x = reach_gcs_tables()\ntry:\n  y = reach_it()\nexcept E:\n  pass")) == [
        1
    ]


def design_map() -> str:
    """The code block of docs/design.md's "The map" section."""
    section = (REPO / "docs" / "design.md").read_text().split("## The map", 1)[1]
    return section.split("```", 2)[1]


def test_the_design_map_names_every_module_and_only_those():
    """Every .py file of lstm/ and tune/ but the packages' __init__ has its line in the map, by
    its path inside its package, and every .py the map names exists."""
    named = {
        f"{package}/{path}"
        for package, listing in re.findall(r"^(\w+)/ .*?\n((?:  .*\n)+)", design_map(), re.M)
        for path in re.findall(r"^  {1,2}([\w/]+\.py)\s", listing, re.M)
    }
    files = {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert named == {f for f in files if not f.endswith("__init__.py")}


DOC_SHARE_LIMIT = 0.12  # docstrings and comment lines over all lines of lstm/ and tune/


def test_docstrings_and_comments_stay_a_small_share_of_the_code():
    """What bench/doc_share.py counts (docstring lines and comment-only lines) stays at most
    12% of lstm/ and tune/: explanations in a few lines, measurements in bench/README.md."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("doc_share", REPO / "bench" / "doc_share.py")
    doc_share = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(doc_share)
    assert doc_share.docstring_lines('"""a\nb"""\nx = 1\n\ndef f():\n    """c"""\n') == {1, 2, 6}
    assert doc_share.comments("# a\nx = 1  # b\n") == ({1}, {2})
    share = doc_share.share(list(PACKAGES))
    assert share["share"] <= DOC_SHARE_LIMIT, share["most"]


# --------------------------------------------------------------------------- dependencies


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement(name: str) -> str:
    [spec] = [d for d in project()["dependencies"] if re.match(rf"{re.escape(name)}(?![\w\[-])", d)]
    return spec


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def test_ray_is_pinned_to_the_version_the_suite_runs_and_cluster_yaml_installs():
    spec = requirement("ray[default,train,tune]")
    low, high = re.fullmatch(r"ray\[default,train,tune\]>=([\d.]+),<([\d.]+)", spec).groups()
    setup = "\n".join(yaml.safe_load((REPO / "cluster.yaml").read_text())["setup_commands"])
    [cluster_version] = re.findall(r'"ray\[default,train,tune\]==([\d.]+)"', setup)
    for version in (metadata.version("ray"), cluster_version):
        assert version_tuple(low) <= version_tuple(version) < version_tuple(high), version
    assert version_tuple(high)[:2] == (version_tuple(low)[0], version_tuple(low)[1] + 1), "one minor version"


@pytest.mark.parametrize("name, floor", [("torch", "2.3"), ("pyarrow", "14")])
def test_floors(name, floor):
    assert requirement(name) == f"{name}>={floor}"
    assert version_tuple(metadata.version(name)) >= version_tuple(floor)


def test_every_third_party_import_is_a_declared_dependency():
    declared = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in project()["dependencies"]}
    optional = {
        re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower()
        for ds in project()["optional-dependencies"].values()
        for d in ds
    }
    distributions = {
        "ray": "ray",
        "torch": "torch",
        "numpy": "numpy",
        "pyarrow": "pyarrow",
        "matplotlib": "matplotlib",
        "tensorboardX": "tensorboardx",
        "tensorboard": "tensorboard",
        "yaml": "pyyaml",
        "mlflow": "mlflow",
        "optuna": "optuna",
        "pandas": "pandas",
    }
    local = set(PACKAGES) | {"__future__"}
    for module, path in modules().items():
        for node in ast.walk(parsed(path)):
            for name in imported_names(node):
                top = name.split(".")[0]
                if top in local or top in _stdlib():
                    continue
                assert distributions.get(top) in declared | optional, f"{module} imports {top}"


def _stdlib() -> frozenset[str]:
    return frozenset(sys.stdlib_module_names)


def test_the_supported_pythons_are_the_ones_the_suite_and_the_cluster_run():
    """requires-python's floor is the Python that cluster.yaml installs and the README's setup
    names, ruff checks the code for it, and the suite runs on a supported Python (so these
    tests, which read pyproject.toml with tomllib, run on every supported version)."""
    floor = re.fullmatch(r">=(3\.\d+)", project()["requires-python"]).group(1)
    setup = "\n".join(yaml.safe_load((REPO / "cluster.yaml").read_text())["setup_commands"])
    assert re.findall(r"uv venv --python (3\.\d+)", setup) == [floor]
    assert f"Python {floor} and pip" in (REPO / "README.md").read_text()
    ruff = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    assert ruff == "py" + floor.replace(".", "")
    assert sys.version_info[:2] >= version_tuple(floor)


def readme_commands() -> list[str]:
    """The shell commands of the README's "Two commands" section, in order."""
    section = (REPO / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_ci_runs_exactly_the_readmes_test_command():
    setup_and_run, setup_and_test = readme_commands()
    assert setup_and_run.endswith("jobs/rectangle.py") and "pytest" in setup_and_test
    assert setup_and_test.splitlines()[-1] in (REPO / ".ci" / "run").read_text().splitlines()
    assert "ruff check ." in setup_and_test and "ruff format --check ." in setup_and_test
