"""pytest hooks that write docs/reliability.md from the reliability suite's own results (imported by conftest.py).

A test of ``tests/test_reliability*.py`` or ``tests/test_cluster*.py`` joins the table with ``@pytest.mark.reliability(fault="...", behaviour="...")`` (on the function, or on a
``pytest.param`` for one row per parameter); a test with several allowed outcomes says which one happened with
``record_property("outcome", ...)``, and the row says it. The table is produced at the end of a session only when
every non-heavy reliability test of every ``tests/test_reliability*.py`` file ran, so a partial run (``-k``, one
file) never replaces it with fewer rows; heavy tests that did not run are listed as "not run (heavy)".

It cannot drift: when the rows produced differ from the committed file's, the file is rewritten with the code (git
trees of mecpe/ and tests/), date and versions of this run in its header, and under CI (``MECPE_CI=1``, set by
``.ci/run``) the session fails, naming what changed, so a stale table never lands. Package versions other than the
header's alone fail nothing: CI installs the newest releases, so a release elsewhere would fail a commit whose table
still holds (it did: transformers 5.24 -> 5.25 failed the run of 21796bf with every row equal); one line names them. Heavy rows that a default run leaves out keep their last result, dated. Equal rows and versions leave the
file (and its header: the run that wrote it) untouched. Outside CI the file is rewritten only when asked
(``MECPE_RELIABILITY_DOC=write``); a user's run with other package versions gets one line saying so and leaves the
checkout clean.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
_FILES = ("test_reliability*.py", "test_cluster*.py")  # the files whose marked tests make the table


def _ours(path) -> bool:
    return any(Path(str(path)).match(pattern) for pattern in _FILES)

_items: dict[str, dict] = {}  # nodeid -> row (every reliability test collected, before deselection)
_results: dict[str, str] = {}  # nodeid -> outcome
_files_seen: set[str] = set()


def _is_reliability(item) -> bool:
    return _ours(item.fspath) and item.get_closest_marker("reliability") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Runs before -m / -k deselection: remembers every reliability test that exists."""
    for item in items:
        if _ours(item.fspath):
            _files_seen.add(Path(str(item.fspath)).name)
        if not _is_reliability(item):
            continue
        mark = item.get_closest_marker("reliability")
        _items[item.nodeid] = {"fault": mark.kwargs.get("fault", item.name),
                               "behaviour": mark.kwargs.get("behaviour", ""),
                               "heavy": item.get_closest_marker("heavy") is not None,
                               "file": Path(str(item.fspath)).name, "name": item.name, "index": len(_items)}


def pytest_runtest_logreport(report):
    if report.nodeid not in _items:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        if report.when == "setup" and outcome == "failed":
            outcome = "error"
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        note = dict(report.user_properties).get("outcome")  # which of the allowed outcomes happened
        _results[report.nodeid] = f"{outcome} ({note})" if note and outcome == "passed" else outcome
    elif report.when == "teardown" and report.outcome == "failed":
        _results[report.nodeid] = "error"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "ray", "pyarrow", "moto")


def _versions() -> str:
    out = []
    for pkg in _PACKAGES:
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} (absent)")
    return ", ".join(out)


def _provenance() -> list[str]:
    """Which code and which packages wrote the table. The code is named by the git trees of mecpe/ and tests/ as
    they ran (this file changes the commit's tree, not theirs): ``git rev-parse COMMIT:mecpe`` prints the same for a
    commit that holds that code, whatever HEAD the checkout had."""
    import sys

    sys.path.insert(0, str(REPO))
    from mecpe.provenance import code_version

    code = code_version(str(REPO), subtrees=("mecpe", "tests"))
    trees = code.get("subtrees") or {}
    state = "the files of HEAD" if code["dirty"] is False else "files that differ from HEAD"
    return [f"Written by the run of {datetime.date.today().isoformat()} with {state} ({(code['commit'] or '?')[:7]}); "
            f"code trees mecpe/ {(trees.get('mecpe') or '?')[:12]}, tests/ {(trees.get('tests') or '?')[:12]} "
            f"(`git rev-parse COMMIT:mecpe` names the same tree for a commit with this code).",
            "", f"Versions: {_versions()}.", ""]


def render(items: dict[str, dict], results: dict[str, str], kept: dict[str, str] | None = None
           ) -> tuple[list[str], list[str]]:
    """(header lines, table lines: the rows and the totals, what must not drift). ``kept``: the committed results of
    heavy rows (by node id), which a default run does not run and so keeps."""
    counts: dict[str, int] = {}
    header = [
        "# Reliability and security",
        "",
        "Generated by the reliability suite (`tests/test_reliability*.py`, `tests/test_cluster*.py`; hooks in",
        "`tests/_reliability_report.py`) from the results of the run that wrote it; do not edit by hand. Regenerate",
        "with `MECPE_RELIABILITY_DOC=write pytest tests/test_reliability*.py tests/test_cluster*.py` (`-m 'heavy or",
        "not heavy'` reruns the heavy rows too; a default run keeps their last result, dated). CI fails when its run",
        "produces other rows than these; the header names the package versions of the run that wrote it.",
        "Faults are injected into the real system:",
        "a tiny Llama model on CPU, a real local Ray (single node, or several nodes with `ray.cluster_utils`), a real",
        "S3 server (moto) on loopback; nothing is mocked.",
        "",
    ]
    table = ["| fault or input class | what mecpe does | test | result |", "|---|---|---|---|"]
    # by file, then as defined: a full run and `pytest tests/test_reliability*.py tests/test_cluster*.py` collect the
    # files in other orders, and the table must not change with the command that ran it
    for nodeid, row in sorted(items.items(), key=lambda kv: (kv[1]["file"], kv[1].get("index", 0))):
        result = results.get(nodeid)
        if result is not None and row["heavy"]:
            result = f"{result} (heavy run of {datetime.date.today().isoformat()})"
        if result is None and row["heavy"]:  # a default run: the last heavy run's result stands, dated
            result = (kept or {}).get(nodeid, "not run (heavy)")
        result = result or "not run"
        key = result.split(" (")[0] if result.startswith(("passed", "failed")) else result
        counts[key] = counts.get(key, 0) + 1
        test = f"`{row['file']}::{row['name']}`" + (" (heavy)" if row["heavy"] else "")
        table.append(f"| {_cell(row['fault'])} | {_cell(row['behaviour'])} | {_cell(test)} | {_cell(result)} |")
    table += ["", "Totals: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + "."]
    return header, table


def _table_of(text: str) -> list[str]:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| fault or input class")), len(lines))
    return [line for line in lines[start:] if line.strip()]


def pytest_sessionfinish(session, exitstatus):
    if not _items or os.environ.get("MECPE_RELIABILITY_DOC") == "0":
        return
    expected = {p.name for pattern in _FILES for p in (REPO / "tests").glob(pattern)}
    if not expected <= _files_seen:
        return  # some reliability files were not collected: a partial run
    if any(nodeid not in _results for nodeid, row in _items.items() if not row["heavy"]):
        return  # -k, -x or an interrupted run: keep the last complete table
    if hasattr(session.config, "workerinput"):
        return  # xdist worker
    committed = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    header, table = render(_items, _results, _heavy_results(committed))
    drift = _version_drift(committed)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _table_of(committed) == [line for line in table if line.strip()]:
        if drift and reporter is not None:  # the same rows: the file keeps the header of the run that wrote it
            reporter.write_line(f"docs/reliability.md: the same rows with other package versions ({drift}); "
                                "left as it is.")
        return
    ci, write = os.environ.get("MECPE_CI") == "1", os.environ.get("MECPE_RELIABILITY_DOC") == "write"
    if ci or write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text("\n".join(header + _provenance() + table) + "\n", encoding="utf-8")
    old, new = _table_of(committed), [line for line in table if line.strip()]
    changed = [line for line in new if line not in set(old)]
    gone = [line for line in old if line not in set(new)]
    why = (f"this run produced other rows ({len(changed)} new or changed, e.g. {changed[:3]})" if changed
           else f"rows of the committed file are gone ({len(gone)}, e.g. {gone[:3]})" if gone
           else "the committed rows are in another order")
    action = ("the file was regenerated: commit it" if ci or write
              else "left as it is (MECPE_RELIABILITY_DOC=write regenerates it)")
    if reporter is not None:
        reporter.write_line(f"docs/reliability.md differs from this run: {why}; {action}.", red=ci)
    if ci:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _heavy_results(committed: str) -> dict[str, str]:
    """The committed result of every heavy row, by node id (the test cell names file and test)."""
    out = {}
    for line in _table_of(committed)[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if len(cells) == 4 and cells[2].endswith("(heavy)"):
            file, name = cells[2].removesuffix(" (heavy)").strip("`").split("::", 1)
            out[f"tests/{file}::{name}"] = cells[3]
    return out


def _version_drift(committed: str) -> str:
    """'' when the header's versions are the installed ones, else what differs."""
    line = next((ln for ln in committed.splitlines() if ln.startswith("Versions: ")), None)
    now = _versions()
    if line is None:
        return f"no versions in the header; installed: {now}"
    was = line.removeprefix("Versions: ").rstrip(".")
    if was == now:
        return ""
    old, new = dict(v.rsplit(" ", 1) for v in was.split(", ")), dict(v.rsplit(" ", 1) for v in now.split(", "))
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in new if old.get(k) != new.get(k))
