"""Django integration, used as a Django project would use it.

The tests live in tests/djangoproject/suite*.py, next to the tiny project they exercise. They run
once, in a separate pytest process with ``DJANGO_SETTINGS_MODULE=djangoproject.settings``: Django
settings, once configured, cannot be unconfigured, and a configured Django changes how replaylog
resolves its settings for every other test in this process. Each test function of the suites is
then reported here as its own test, with the inner failure as its message.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# suite.py, suite_on_commit.py, ...: run as test_djangoproject.py, test_djangoproject_on_commit.py
SUITES = sorted((HERE / "djangoproject").glob("suite*.py"))
SUITE_TESTS = [
    node.name
    for suite in SUITES
    for node in ast.parse(suite.read_text(encoding="utf-8")).body
    if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
]


@dataclass
class SuiteRun:
    returncode: int
    output: str
    outcomes: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)


def _run_suite(workdir: Path) -> SuiteRun:
    test_files = []
    for suite in SUITES:
        test_file = f"test_djangoproject{suite.stem.removeprefix('suite')}.py"
        shutil.copy(suite, workdir / test_file)
        test_files.append(test_file)
    report = workdir / "report.xml"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("REPLAYLOG_", "EXPIRE_REPLAY_LOGS_MS", "DJANGO_", "PYTEST_"))
    }
    env["DJANGO_SETTINGS_MODULE"] = "djangoproject.settings"
    # Nothing listens on port 1: whatever escapes the plugin's test server fails loudly.
    env["REPLAYLOG_URL"] = "redis://127.0.0.1:1/0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable, "-m", "pytest", *test_files,
            "-p", "no:cacheprovider", "-v", "-rfE", f"--junitxml={report}",
            f"--basetemp={workdir / 'tmp'}",
        ],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    run = SuiteRun(proc.returncode, proc.stdout + proc.stderr)
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            name = case.get("name", "")
            outcome, detail = "passed", ""
            for tag in ("failure", "error", "skipped"):
                element = case.find(tag)
                if element is not None:
                    outcome = tag
                    detail = f"{element.get('message', '')}\n{element.text or ''}"
                    break
            run.outcomes.setdefault(name.split("[", 1)[0], []).append((name, outcome, detail))
    return run


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> SuiteRun:
    return _run_suite(tmp_path_factory.mktemp("djangoproject"))


@pytest.mark.parametrize("test_name", SUITE_TESTS)
def test_djangoproject(suite_run: SuiteRun, test_name: str) -> None:
    cases = suite_run.outcomes.get(test_name)
    assert cases, f"{test_name} did not run in the Django suite:\n{suite_run.output[-6000:]}"
    bad = [f"{name}: {outcome}\n{detail}" for name, outcome, detail in cases if outcome != "passed"]
    assert not bad, "\n\n".join(bad)


def test_djangoproject_suite_ran_whole(suite_run: SuiteRun) -> None:
    # Failing tests are reported above, one by one; here: it ran, collected all, skipped none.
    assert len(set(SUITE_TESTS)) == len(SUITE_TESTS), "a test name is in two suites"
    assert suite_run.returncode in (0, 1), suite_run.output[-6000:]
    assert set(suite_run.outcomes) == set(SUITE_TESTS), suite_run.output[-6000:]
    outcomes = [o for cases in suite_run.outcomes.values() for _, o, _ in cases]
    assert "skipped" not in outcomes and "error" not in outcomes, suite_run.output[-6000:]
    # Every MALFORMED case of the parametrized check test ran.
    assert len(suite_run.outcomes["test_checks_report_each_malformed_setting"]) >= 20
