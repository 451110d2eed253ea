"""Is this environment the lock? Exit 1, naming each package, if not; 0 if it is.

    python scripts/check_env.py [requirements.lock]

`make test` runs it first, so a test run on versions other than the tested ones stops before any
test starts. Checks, in order:
1. `pip check`: every installed package's own requirements are met;
2. every package the lock pins is installed at exactly the pinned version.
Packages installed beyond the lock (a user's `pip install optuna-dashboard`) are listed but do not
fail the check; pip, setuptools and the project itself are not in the lock by design.
"""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
NOT_LOCKED = {"pip", "setuptools", "wheel", "memloc"}  # the installer's own tools and this project


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as f:
        for line in f:
            m = PIN.match(line)
            if m:
                pins[normalize(m.group(1))] = m.group(2)
    if not pins:
        raise SystemExit(f"error: {path} pins no package (is it a lock file?)")
    return pins


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def compare(pins: dict[str, str], have: dict[str, str]) -> tuple[list[str], list[str]]:
    """(problems, extras): a line per package that differs from the lock, and the names installed
    beyond it."""
    problems = []
    for name, want in sorted(pins.items()):
        got = have.get(name)
        if got is None:
            problems.append(f"{name}: not installed (the lock pins {want})")
        elif got != want:
            problems.append(f"{name}: {got} installed, the lock pins {want}")
    extras = sorted(n for n in have if n not in pins and n not in NOT_LOCKED)
    return problems, extras


def main(argv: list[str]) -> int:
    lock = argv[0] if argv else "requirements.lock"
    pins = read_lock(lock)
    pc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems, extras = compare(pins, installed())
    if pc.returncode != 0:
        problems = [f"pip check: {line}" for line in pc.stdout.strip().splitlines()] + problems
    if extras:
        print(f"note: installed beyond {lock} (not checked): {', '.join(extras)}", file=sys.stderr)
    if problems:
        print(f"error: this environment is not {lock} ({len(problems)} difference(s)):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("  reinstall it: rm -rf .venv && make install  (or update the lock: make lock, see README)",
              file=sys.stderr)
        return 1
    print(f"environment matches {lock}: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
