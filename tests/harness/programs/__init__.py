"""Small programs the tests run in other processes (as other users, under other environments).
`source(name)` gives a program's text, to run with `python -c` (the checkout itself may be
unreadable for a test user)."""
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def source(name: str) -> str:
    return (_HERE / f"{name}.py").read_text()
