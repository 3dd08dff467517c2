"""Load a script from bench/ as a module, so tests run the same code the benches do."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py, loaded once per process as module `bench_<name>`."""
    modname = f"bench_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod      # dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    return mod
