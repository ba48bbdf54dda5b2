"""Every module a network service may need is loaded before it drops privileges.

Services fork from the supervisor (or start as root) and then run as the mail user, when the files
of the interpreter and of its virtualenv may be unreadable (a pyenv under /root, a private
checkout). A function-level import that nothing loaded earlier then fails at the worst moment: on
an error path, or for one customer's rarer password scheme. This test imports each service's
module in a fresh interpreter and lists every function-level import in the pqmail modules so loaded
that is not loaded yet.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Imports that may stay lazy, and why.
ALLOWED = {
    ("pqmail.config.control", "pqmail.config.reference"): "showctl's KNOWN_FILES only, never a service",
    ("pqmail.syncfs", "ctypes"): "syncfs.available() loads it; drop_privileges and the zygote call it first",
    ("pqmail.provision", "pqmail.passwords"): "box and password commands only, not the serialmail runner",
}

# What runs as the mail user (or a box owner: lspawn's delivery processes). The queue manager keeps
# root, so it may import late.
SERVICES = ["pqmail.smtp.server", "pqmail.pop3.server", "pqmail.serialmail.odmr",
            "pqmail.serialmail.runner", "pqmail.queue.lspawn"]


def _loaded_after_import(module: str) -> dict[str, str]:
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps({n: getattr(m, '__file__', None) or '' for n, m in sys.modules.items()}))")
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, check=True, timeout=120)
    return json.loads(out.stdout)


def _lazy_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    found += [(sub.lineno, a.name) for a in sub.names]
                elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                    found.append((sub.lineno, sub.module))
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_module_loads_what_its_code_imports_later(service):
    loaded = _loaded_after_import(service)
    missing = []
    for name, file in sorted(loaded.items()):
        if not name.startswith("pqmail") or not file.endswith(".py"):
            continue
        for line, target in _lazy_imports(Path(file)):
            if target not in loaded and (name, target) not in ALLOWED:
                missing.append(f"{name}:{line} imports {target}")
    assert missing == [], f"after `import {service}` these are still lazy: {missing}"
