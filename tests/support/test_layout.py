"""The suite's layout: every test module in one tier (scripts/test.sh --tier), none importing another."""

import ast
import os
import re

from helpers import REPO

TESTS = os.path.join(REPO, "tests")


def module_paths():
    return [os.path.join(folder, name) for folder, _, names in os.walk(TESTS) for name in names
            if name.startswith("test_") and name.endswith(".py")]


def test_every_test_module_is_in_one_of_the_tiers_test_sh_runs():
    with open(os.path.join(REPO, "scripts", "test.sh"), encoding="utf-8") as f:
        tiers = re.search(r"^TIERS=\(([^)]*)\)", f.read(), re.M).group(1).split()
    assert tiers == ["unit", "integration", "pipeline", "support"]
    outside = [os.path.relpath(p, TESTS) for p in module_paths() if os.path.relpath(p, TESTS).split(os.sep)[0]
               not in tiers or os.path.dirname(os.path.relpath(p, TESTS)).count(os.sep)]
    assert not outside, f"test modules outside tests/{{{','.join(tiers)}}}: {outside}"


def test_no_test_module_imports_another():
    offenders = []
    for path in module_paths():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{os.path.relpath(path, TESTS)} imports {name}" for name in names
                          if name.split(".")[0].startswith("test_")]
    assert not offenders, "shared test code belongs in tests/support: " + "; ".join(offenders)
