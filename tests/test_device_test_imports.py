"""The test modules the device scripts run (benchmarks/*.sh name them) import on a machine
without the HTTP and client packages: the H200's Python has no openai, fastapi, uvicorn,
pydantic, aiohttp or langchain. Their imports (also those inside test functions, followed
through the tests' own helper modules) are loaded in a fresh interpreter where those packages
cannot be found. A helper that pulls in `openai` made six GPU tests fail on the H200 on an
ImportError (RESULTS.md, 2026-12-02)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent
ABSENT = ("openai", "fastapi", "uvicorn", "pydantic", "aiohttp", "langchain_openai", "langchain_core", "httpx")


def device_test_modules() -> set[str]:
    names = set()
    for script in (ROOT / "benchmarks").glob("*.sh"):
        names |= set(re.findall(r"tests/(\w+)\.py", script.read_text()))
    return names


def local_imports(name: str) -> set[str]:
    """Modules of tests/ that module `name` imports anywhere in its source."""
    out = set()
    for node in ast.walk(ast.parse((TESTS / f"{name}.py").read_text())):
        mods = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        out |= {m for m in mods if (TESTS / f"{m}.py").exists()}
    return out


def test_device_scripts_test_modules_import_without_client_packages():
    todo, seen = sorted(device_test_modules()), set()
    assert "test_triton_greedy_gpu" in todo
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(local_imports(m) - seen)
    assert "test_mixed_batches" in seen and "hand_stepped" in seen     # followed into function bodies
    code = f"""
import importlib, importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
sys.meta_path.insert(0, Absent())
sys.path.insert(0, {str(TESTS)!r})
for m in {sorted(seen)!r}:
    importlib.import_module(m)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
