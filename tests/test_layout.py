"""The arrows between the packages point one way: the contract imports nothing heavy, the scoring core no Celery,
the producer and the gateway never the worker."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

HEAVY = {
    "contract": {"celery", "kombu", "redis", "torch", "transformers", "producer", "scoring", "worker", "gateway"},
    "scoring": {"celery", "kombu", "redis", "producer", "worker", "gateway"},
}
"""For each package, the top-level modules that importing any of its modules must not load."""


def modules_of(package: str) -> list[str]:
    """Every module of `package`, as dotted names."""
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / package).rglob("*.py")
    )


@pytest.mark.parametrize("package", sorted(HEAVY))
def test_importing_every_module_of_a_package_loads_nothing_above_it(package):
    # Given a fresh interpreter (if all of them together load none of it, none of them alone does)
    probe = (
        "import importlib, json, sys\n"
        "for module in sys.argv[1:]: importlib.import_module(module)\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    modules = modules_of(package)
    # When every module of the package is imported
    done = subprocess.run([sys.executable, "-c", probe, *modules], cwd=ROOT, capture_output=True, text=True, check=True)
    # Then nothing it must not reach was loaded
    assert len(modules) >= 7 and not HEAVY[package] & set(json.loads(done.stdout)), done.stdout


@pytest.mark.parametrize("package", ["producer", "gateway", "contract", "scoring"])
def test_no_module_of_the_client_side_names_the_worker(package):
    # Given every import statement of the package's modules, read from the source
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            # Then none of them is the worker package (the no-broker mode is found by entry point)
            assert not [name for name in names if name.split(".")[0] == "worker"], f"{path.relative_to(ROOT)} imports {names}"
