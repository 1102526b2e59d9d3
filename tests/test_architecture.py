"""The code's rules (docs/architecture.md), checked on the source: no import circle, command-line concerns only in
the CLI, user errors caught by the CLI only, pure prompts, each concept defined once, small modules, no
module-global mutable state."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "mecpe"


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """mecpe modules a file imports anywhere (module level or inside functions), resolved to modules."""
    modules = {_module(p) for p in PKG.rglob("*.py")}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mecpe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mecpe"):
            for a in node.names:  # `from mecpe import storage` names a module; `from mecpe.x import f` does not
                out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) - {_module(p)} for p in PKG.rglob("*.py")}


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_layers_point_one_way():
    """Lower layers never import higher ones: the errors and the labels know no other mecpe module, storage only the
    errors, config the labels and errors; the ECF schema knows storage and the labels, its readers the schema; prompts
    know only the labels, calibrate the labels and errors; the official metric knows no step; the engine knows
    nothing but itself; the CLI is imported by nothing but jobs/."""
    graph = _graph()
    allowed = {
        "mecpe.errors": set(),
        "mecpe.storage": {"mecpe.errors"},
        "mecpe.labels": set(),
        "mecpe.special_tokens": set(),
        "mecpe.config": {"mecpe.labels", "mecpe.errors"},
        "mecpe.layout": {"mecpe.storage"},
        "mecpe.data": {"mecpe.storage", "mecpe.labels"},
        "mecpe.readers": {"mecpe.data", "mecpe.storage"},
        "mecpe.prompts": {"mecpe.labels"},
        "mecpe.calibrate": {"mecpe.labels", "mecpe.errors"},
        "mecpe.metric": {"mecpe.errors", "mecpe.labels", "mecpe.storage"},
        "mecpe.evaluate": {"mecpe.metric", "mecpe.calibrate", "mecpe.labels"},
        "mecpe.sources": {"mecpe.storage", "mecpe.special_tokens", "mecpe.errors"},
        "mecpe.modeling": {"mecpe.sources", "mecpe.special_tokens", "mecpe.config"},
    }
    for module, deps in allowed.items():
        assert graph[module] <= deps, f"{module} imports {graph[module] - deps}"
    for module in (m for m in graph if m.startswith("mecpe.engine")):
        assert all(d.startswith("mecpe.engine") for d in graph[module]), f"{module} imports {graph[module]}"
    assert not [m for m, deps in graph.items() if "mecpe.cli" in deps], "library code imports the CLI"
    scoring = {"mecpe.evaluate", "mecpe.metric", "mecpe.report"}
    assert not scoring & set().union(*(graph[m] for m in graph if m.startswith("mecpe.infer"))), \
        "inference imports evaluation (scoring belongs to the evaluate step)"


def test_command_line_concerns_only_in_the_cli():
    """Argument parsing, printing and exit codes live in mecpe/cli.py; library modules return values, raise errors
    and log progress."""
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} print()")
            elif isinstance(node, ast.Attribute) and node.attr == "exit" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} sys.exit")
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and "argparse" in ast.unparse(node):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} argparse")
    assert not offenders, offenders
    for job in (REPO / "jobs").glob("*.py"):
        assert "from mecpe.cli import main" in job.read_text(), f"{job.name} must be a call into the CLI"


def test_prompts_are_pure():
    tree = ast.parse((PKG / "prompts.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"ray", "torch", "transformers", "pyarrow", "os"}, imported


def test_each_concept_defined_once():
    """The emotion labels, the Ray connection and the reject record are each defined in one place."""
    labels, connects, rejects = [], [], []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        if '"neutral", "anger", "disgust"' in text:
            labels.append(path.name)
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "ray.init":
                connects.append(path.name)
            if isinstance(node, ast.ClassDef) and "Reject" in node.name and "Error" not in node.name:
                rejects.append(path.name)
    assert labels == ["labels.py"], labels
    assert connects == ["cluster.py"], connects
    assert rejects == ["data.py"], rejects


MAX_LINES = 450


def test_no_module_is_over_450_lines():
    """A module over 450 lines holds more than one concern: split it by concern (as predict.py became engine/)."""
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}, {p: n for p, n in sizes.items() if n > MAX_LINES}


# Module-level names that hold mutable state, each with the reason it is kept. Everything else at module level
# is a constant (a literal tuple, frozenset, string, number, compiled pattern, class, function or logger).
GLOBAL_STATE_ALLOWED = {
    "mecpe/sources.py:_RESOLVED": "per-process memo of resolved model folders (a node resolves an s3:// mirror or "
                                  "a GGUF conversion once)",
    "mecpe/storage.py:_settings": "the S3 settings of this process, set once per process (storage.configure) so "
                                  "that Ray workers read and write where the driver does",
    "mecpe/infer/stages.py:_DONE_CACHE": "per worker process: the finished uids fetched once from the object store "
                                         "for all the parse tasks of a run (one entry, replaced per run)",
}
_MUTABLE_CALLS = {"dict", "list", "set", "Counter", "defaultdict", "OrderedDict", "deque", "bytearray"}


def _module_state(tree: ast.Module, rel: str) -> list[str]:
    found = []
    for node in tree.body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
            isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in _MUTABLE_CALLS)
        if mutable:
            found += [f"{rel}:{ast.unparse(t)}" for t in targets]
    found += [f"{rel}:{name}" for n in ast.walk(tree) if isinstance(n, ast.Global) for name in n.names]
    return found


def test_no_module_global_mutable_state():
    """No module keeps mutable state at module level (counters a caller must diff, caches nobody resets): results
    travel as return values. The allowlist names each exception and why; read-only tables are tuples or frozen."""
    found = []
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(REPO))
        found += [f for f in _module_state(ast.parse(path.read_text()), rel) if f not in GLOBAL_STATE_ALLOWED]
    assert not found, found
    # the check sees the counters predict.py had (STATS = {...}) and a `global`
    assert _module_state(ast.parse("STATS: dict = {'emotion': 0}\ndef f():\n    global N\n"), "x") == \
        ["x:STATS", "x:N"]


def _user_error_names() -> set[str]:
    tree = ast.parse((PKG / "errors.py").read_text())
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef)}


def _catches_user_errors(tree: ast.AST, names: set[str]) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            caught = {ast.unparse(t).split(".")[-1] for t in
                      (node.type.elts if isinstance(node.type, ast.Tuple) else [node.type])}
            if caught & names:
                lines.append(node.lineno)
    return lines


def test_only_the_cli_catches_user_errors():
    """A ``MecpeError`` (or a subclass: ``mecpe.errors``) travels up to the CLI, which prints it and exits with its
    code; no library module catches one to convert it into another error, a status or a value (``step_infer``
    asks ``metric.id_problem`` whether labelled input can be scored rather than catching the scorer's error)."""
    names = _user_error_names()
    assert {"MecpeError", "EvaluationError", "RunMismatchError", "ConfigError"} <= names
    offenders = [f"{p.relative_to(REPO)}:{line}" for p in PKG.rglob("*.py") if p.name != "cli.py"
                 for line in _catches_user_errors(ast.parse(p.read_text()), names)]
    assert not offenders, offenders
    cli = ast.parse((PKG / "cli.py").read_text())
    assert _catches_user_errors(cli, names), "the CLI catches MecpeError"
    assert _catches_user_errors(ast.parse("try:\n    f()\nexcept (KeyError, errors.EvaluationError):\n    pass\n"),
                                names) == [3]


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _artefact_names() -> tuple[set[str], set[str]]:
    """(file names, folder names) that mecpe.layout defines: its string constants, and those its methods join."""
    tree = ast.parse((PKG / "layout.py").read_text())
    docs = _docstrings(tree)
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}  # f"{name}.json"
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and id(n) not in docs | parts and " " not in n.value}
    files = {s for s in strings if "." in s.strip(".") or s.startswith(".")}
    folders = {s.rstrip("/") for s in strings - files if s.rstrip("/").isidentifier()}
    return files, folders


def test_every_artefact_is_named_in_the_layout_only():
    """No module but mecpe/layout.py spells the name of a run's file (``"summary.json"``, ``"mecpe_train.json"``) or
    joins a run's folder by name (``storage.join(out, "records")``): moving an artefact is one edit. Docstrings may
    mention them. Catches, e.g., ``storage.join(output_uri, "summary.json")`` written back into infer/driver.py."""
    files, folders = _artefact_names()
    assert {"Subtask_2_pred.json", "summary.json", "mecpe_train.json", "_run.json"} <= files, files
    assert {"records", "adapter", "data", "inference"} <= folders, folders
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "layout.py":
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if any(node.value == f or node.value.endswith("/" + f) for f in files):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("storage.join", "os.path.join", "_join")):
                offenders += [f"{path.relative_to(REPO)}:{node.lineno} joins {a.value!r}" for a in node.args[1:]
                              if isinstance(a, ast.Constant) and a.value in folders]
    assert not offenders, offenders


def _documented_imports() -> dict[str, set[str]]:
    """docs/architecture.md's "In detail" paragraph: ``a → {b, c}``, ``a → b``, ``pkg.{...} → {...}`` (what the
    package imports from outside itself) and "``x``, ``y`` import no other mecpe module"."""
    import re

    doc = (REPO / "docs" / "architecture.md").read_text()
    para = doc[doc.index("In detail:"):].split("\n\n")[0].replace("\n", " ")
    out: dict[str, set[str]] = {}
    pairs = re.findall(r"`([\w.]+) → \{?([^`}]*)\}?`", para)  # `a → {b, c}`
    pairs += re.findall(r"`(\w+)\.\{[^`]*\}` → `\{([^`}]*)\}`", para)  # `pkg.{...}` → `{b, c}`
    for name, deps in pairs:
        out[name] = {d.strip() for d in deps.split(",") if d.strip()}
    none = re.search(r"((?:`\w+`,? (?:and )?)+)import no other mecpe module", para)
    for name in re.findall(r"`(\w+)`", none.group(1)):
        out[name] = set()
    return out


def test_the_architecture_doc_lists_the_real_imports():
    """Every module's (or package's) mecpe imports as the doc lists them, no more and no fewer: adding an import
    without the doc, or the doc without the import, fails CI."""
    graph = _graph()
    documented = _documented_imports()
    assert {"cli", "pipeline", "train", "infer", "layout", "storage", "data"} <= set(documented), documented
    problems = []
    for name, deps in documented.items():
        inside = [m for m in graph if m == f"mecpe.{name}" or m.startswith(f"mecpe.{name}.")]
        assert inside, f"the doc names {name}, which is no mecpe module"
        real = {d.removeprefix("mecpe.") for m in inside for d in graph[m]} - {"mecpe"}
        real = {d for d in real if not (d == name or d.startswith(f"{name}."))}  # a package's own modules
        if real != deps:
            problems.append(f"{name}: doc {sorted(deps)}, code {sorted(real)}")
    assert not problems, problems


_FILE_CALLS = ("open", "os.makedirs", "os.replace", "os.remove", "os.rename", "os.walk", "os.listdir", "os.scandir",
               "shutil.", "tempfile.", "Path(")


def _local_file_access() -> set[str]:
    """Modules (``train.recipe``) outside storage that open, list, move or create local files themselves."""
    out = set()
    for path in PKG.rglob("*.py"):
        name = _module(path).removeprefix("mecpe.")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).startswith(_FILE_CALLS):
                out.add(name)
    return out - {"storage"}


def test_file_access_outside_storage_is_what_the_doc_says():
    """docs/architecture.md names the modules that touch local files outside ``storage`` (their own scratch): a new
    one, or one that no longer does, fails until the doc says so (a module given an ``open`` fails it)."""
    import re

    doc = " ".join((REPO / "docs" / "architecture.md").read_text().split())
    sentence = doc[doc.index("local file access outside storage:"):].split(". ")[0]
    documented = set(re.findall(r"`([\w.]+)`", sentence)) - {"storage"}
    assert documented and _local_file_access() == documented, (sorted(_local_file_access()), sorted(documented))
    # the check sees a new open() in a module not listed
    tree = ast.parse("def f(p):\n    with open(p) as fh:\n        return fh.read()\n")
    assert any(isinstance(n, ast.Call) and ast.unparse(n.func).startswith(_FILE_CALLS) for n in ast.walk(tree))
