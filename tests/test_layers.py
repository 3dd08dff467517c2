"""The package's layers (docs/ARCHITECTURE.md): each subpackage imports only the layers below it,
and nothing below the front ends speaks D-Bus. Walks every module's imports with `ast`, so an
import inside a function counts as much as one at the top."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "secretbus"

# layer -> the layers it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "store": {"core"},
    "fleet": {"core", "store"},
    "driver": {"core", "store", "fleet"},
    "access": {"core"},
    "bus": {"core", "driver", "access"},
    "rpc": {"core", "driver", "access"},
}
TOP = "top"                        # daemon.py, cli.py, uri.py, …: may import everything
FRONT_ENDS = {"bus", "rpc", TOP}
PROTOCOL_LIBS = {"dbus_fast"}      # only front ends speak a bus protocol


def _layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "secretbus":
        raise ValueError(module)
    return parts[1] if len(parts) >= 2 and parts[1] in ALLOWED else TOP


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, relative ones resolved."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None or mod in ("secretbus",) or mod.count(".") == 1 and mod.startswith("secretbus."):
                # `from secretbus import x` / `from secretbus.core import errors`: x may be a module
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_layer_of_the_design_exists():
    for layer in ("core", "store", "driver", "access", "bus"):
        assert (PKG / layer / "__init__.py").is_file(), layer


def test_the_walker_sees_a_violation():
    # The check itself must be able to fail: a core module importing the driver is caught.
    bad = PKG / "core" / "_layer_probe_tmp.py"
    bad.write_text("from secretbus.driver import driver\nimport dbus_fast\n")
    try:
        assert _violations([bad]) == [
            f"{bad.relative_to(PKG.parent)}:1: core imports secretbus.driver.driver (layer driver)",
            f"{bad.relative_to(PKG.parent)}:2: core imports dbus_fast (only front ends may)",
        ]
    finally:
        bad.unlink()


def _violations(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        layer = _layer_of(_module_name(path))
        where = path.relative_to(PKG.parent)
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            if top in PROTOCOL_LIBS and layer not in FRONT_ENDS:
                found.append(f"{where}:{line}: {layer} imports {mod} (only front ends may)")
            if top != "secretbus" or layer == TOP:
                continue
            target = _layer_of(mod)
            if target == TOP:
                found.append(f"{where}:{line}: {layer} imports {mod} (the top level)")
            elif target != layer and target not in ALLOWED[layer]:
                found.append(f"{where}:{line}: {layer} imports {mod} (layer {target})")
    return found


def test_no_layer_imports_upward_or_sideways():
    assert _violations(_modules()) == []


def test_a_daemon_without_fleet_or_remote_listeners_loads_none_of_their_libraries():
    """requests/etcd3gw (fleet), scramp (SASL) and cryptography.x509 (TLS) are imported where
    they are used: loading them in every daemon was about half of its import time and
    ~12 MB of its memory (bench/README, 2026-12-03)."""
    code = ("import sys, secretbus.daemon; "
            "print(sorted(m for m in ('requests', 'etcd3gw', 'scramp', 'cryptography.x509', 'importlib.metadata') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


def test_opening_a_local_uri_loads_no_remote_transport(tmp_path):
    """secretbus.open() of a local URI (the CLI's every command) asks only hosturi whether the
    URI is TLS; tls_client and SASL (scramp, ssl contexts) were ~60 ms of each start."""
    code = ("import sys, secretbus; c = secretbus.open(sys.argv[1]); c.list_secrets(); c.close(); "
            "print(sorted(m for m in ('secretbus.rpc.tls_client', 'secretbus.rpc.sasl_client', 'scramp') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, f"secret:///embed?root={tmp_path}"], capture_output=True,
                         text=True, check=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
