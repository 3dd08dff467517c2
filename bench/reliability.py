#!/usr/bin/env python3
"""Reliability figures in one table: crash trials, soak, and (when present) corruption, leak
audit and fuzzing.

    python bench/reliability.py [--size small|full] [--only soak,crash_trials] [--skip fuzz]

Run as root from the repository root with the project's venv. Each section is a sibling module
of this file with `figures(size) -> [(figure, value, goal), ...]`; it starts and stops
everything it needs itself. The modules are imported only when their turn comes. A required
module (crash_trials, soak) that is missing, and any module whose import or figures() raises,
gives a "not available" row that counts as a missed goal; an optional module that does not
exist yet gives a "not available" row that is not judged.

Goals are strings: "-" (or empty) = information only; "0" or a bare number = equal;
"= N", "< N", "<= N", "> N", ">= N" (also ≤ ≥, an optional unit after N such as "%", "s",
"ms", "MB" is ignored) = numeric comparison of the value, or of the number a string value
starts with; any other goal = the value, as text, equals it (case-insensitive).
Prints one markdown table (section, figure, value, goal, met?) and the total time; exit
status 1 if any goal is missed, else 0.
"""
from __future__ import annotations

import argparse
import importlib
import math
import re
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# (module, section name, required?)
SECTIONS = [
    ("crash_trials", "crash", True),
    ("soak", "soak", True),
    ("corruption", "corruption", False),
    ("leak_audit", "leak audit", False),
    ("fuzz", "fuzz", False),
]

_GOAL = re.compile(r"(==|=|<=|>=|≤|≥|<|>)?\s*([-+]?\d[\d,_]*(?:\.\d+)?)\s*([^\d\s].*)?")
_LEADING_NUMBER = re.compile(r"\s*([-+]?\d[\d,_]*(?:\.\d+)?)")


def number(value) -> float | None:
    """The value as a number: int / float / bool, or the number a string starts with."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    m = _LEADING_NUMBER.match(str(value))
    return float(m.group(1).replace(",", "").replace("_", "")) if m else None


def judge(value, goal) -> bool | None:
    """True = met, False = missed, None = not a goal (information only)."""
    g = "" if goal is None else str(goal).strip()
    if g in ("", "-", "—", "–", "n/a"):
        return None
    m = _GOAL.fullmatch(g)
    if m is None:
        return str(value).strip().lower() == g.lower()
    op, target = m.group(1) or "=", float(m.group(2).replace(",", "").replace("_", ""))
    v = number(value)
    if v is None or math.isnan(v):
        return False
    return {"=": v == target, "==": v == target, "<": v < target, ">": v > target,
            "<=": v <= target, "≤": v <= target, ">=": v >= target, "≥": v >= target}[op]


def _strip_prefix(figure: str, module: str, section: str) -> str:
    head, sep, tail = figure.partition(": ")
    names = {module, module.split("_")[0], section, section.split()[0]}
    return tail if sep and head.strip().lower() in names else figure


def run_section(module: str, section: str, required: bool, size: str) -> tuple[list[tuple], float]:
    """Rows (section, figure, value, goal, verdict) for one module; verdict True/False/None."""
    t0 = time.monotonic()
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            why = "not available (module missing)"
            return [(section, why, "-", "-" if not required else "present", None if not required else False)], \
                time.monotonic() - t0
        return [(section, f"not available (import failed: {type(e).__name__}: {e})", "-", "-", False)], \
            time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - a broken sibling must not stop the others
        traceback.print_exc(file=sys.stderr)
        return [(section, f"not available (import failed: {type(e).__name__}: {e})", "-", "-", False)], \
            time.monotonic() - t0
    try:
        figs = list(mod.figures(size))
        for f in figs:
            if not (isinstance(f, (tuple, list)) and len(f) == 3):
                raise TypeError(f"figures() row is not (figure, value, goal): {f!r}")
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - includes SystemExit from a module's own checks
        traceback.print_exc(file=sys.stderr)
        text = str(e).splitlines()[0][:200] if str(e) else ""
        return [(section, f"not available ({type(e).__name__}: {text})", "-", "-", False)], \
            time.monotonic() - t0
    rows = [(section, _strip_prefix(str(f), module, section), v, g, judge(v, g)) for f, v, g in figs]
    return rows, time.monotonic() - t0


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("small", "full"), default="small")
    ap.add_argument("--only", help="comma-separated modules to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated modules to leave out")
    a = ap.parse_args(argv)

    def on_signal(signum, frame):   # unwind like Ctrl-C: every section stops what it started
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    only = set(a.only.split(",")) if a.only else None
    skip = set(filter(None, a.skip.split(",")))
    t0 = time.monotonic()
    rows: list[tuple] = []
    times: list[tuple[str, float]] = []
    for module, section, required in SECTIONS:
        if (only is not None and module not in only) or module in skip:
            continue
        print(f"[reliability] {section} ({module}.figures({a.size!r}))...", file=sys.stderr, flush=True)
        r, secs = run_section(module, section, required, a.size)
        rows += r
        times.append((section, secs))
        print(f"[reliability] {section}: {secs:.1f} s", file=sys.stderr, flush=True)
    total = time.monotonic() - t0

    print(f"## Reliability ({a.size})\n")
    print("| section | figure | value | goal | met? |\n|---|---|---|---|---|")
    mark = {True: "yes", False: "**NO**", None: ""}
    for section, figure, value, goal, ok in rows:
        print(f"| {_cell(section)} | {_cell(figure)} | {_cell(value)} | {_cell(goal)} | {mark[ok]} |")
    missed = [r for r in rows if r[4] is False]
    print()
    print("time: " + ", ".join(f"{s} {t:.1f} s" for s, t in times) + f"; total {total:.1f} s")
    print(f"goals: {sum(r[4] is True for r in rows)} met, {len(missed)} missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
