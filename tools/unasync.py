"""Generate the blocking client (clients/python/wafer_client/_sync.py) from the asyncio one
(_async.py), the way httpcore's unasync script does: the async file is the only one written by hand,
so the two clients cannot drift. Each rule is a plain text substitution; a rule that no longer matches
fails the run, so an edit to _async.py that the rules do not cover is noticed rather than copied
half-translated. The channel code, which differs in kind, is hand-written in _connection.py.

    python tools/unasync.py            # write _sync.py (`make unasync`)
    python tools/unasync.py --check    # exit 1 if _sync.py differs from what would be written
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "python" / "wafer_client"
SOURCE = PACKAGE / "_async.py"
TARGET = PACKAGE / "_sync.py"

# (pattern, replacement), applied in order as regular expressions; each must match at least once.
RULES: list[tuple[str, str]] = [
    (
        r'\A"""The asyncio client \(grpc\.aio\)\. Same methods as the blocking client, awaited\."""\n',
        '"""The blocking client. Generated from _async.py by tools/unasync.py (`make unasync`): edit that\n'
        'file, not this one; tests/unit/test_sync_client_drift.py fails on drift."""\n',
    ),
    # The asyncio-only lint waiver (ASYNC109) and its reason.
    (r"\n(# [^\n]*\n)*# ruff: noqa: ASYNC109\n", ""),
    (r"^import asyncio$", "import time"),
    (r"AsyncGenerator\[([^\[\]]+), None\]", r"Generator[\1, None, None]"),
    (r"\bAsyncGenerator\b", "Generator"),
    (r"\bAsyncConnection\b", "SyncConnection"),
    (r"\bAsyncWaferClient\b", "WaferClient"),
    (
        r"An asyncio Wafer client\. One instance holds one channel, opened on first use and bound to that\n"
        r"    event loop; construct it anywhere, use and close it on one loop\.",
        "A blocking Wafer client. One instance holds one channel; share it across threads.",
    ),
    (
        r"To stop early, ``await\n        stream\.aclose\(\)``: that cancels the call on the server at once, "
        r"where merely leaving the loop\n        waits for the garbage collector\.",
        "Stop iterating (or ``close()``) to\n        cancel the call on the server.",
    ),
    (r"\bawait asyncio\.sleep\(", "time.sleep("),
    (r"\[(\w+) async for \1 in (\w+)\]", r"list(\2)"),
    (r"\basync def ", "def "),
    (r"\basync for ", "for "),
    (r"\bawait ", ""),
    (r"\bgrpc\.aio\.", "grpc."),
    # grpc-stubs types the blocking call's cancel() without annotations.
    (r"^( +)call\.cancel\(\)$", r"\1call.cancel()  # type: ignore[no-untyped-call]"),
]


def unasync(text: str) -> str:
    for pattern, replacement in RULES:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count == 0:
            sys.exit(f"unasync: the rule {pattern!r} matches nothing in {SOURCE.name}; update tools/unasync.py")
    return _ruff(_ruff(text, "check", "--select", "I", "--fix", "--quiet"), "format", "--quiet")


def _ruff(text: str, *args: str) -> str:
    """Run ruff on `text` as if it were _sync.py (so the project's settings apply): imports sorted and
    lines joined again where dropping `async`/`await` made them short."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--stdin-filename", str(TARGET), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if result.returncode != 0:
        sys.exit(f"unasync: ruff {args[0]} failed:\n{result.stderr}{result.stdout}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 if _sync.py is out of date.")
    args = parser.parse_args()
    generated = unasync(SOURCE.read_text(encoding="utf-8"))
    if args.check:
        current = TARGET.read_text(encoding="utf-8")
        if current != generated:
            diff = difflib.unified_diff(current.splitlines(True), generated.splitlines(True), "_sync.py", "generated")
            sys.stderr.write("".join(diff))
            sys.exit(f"{TARGET.relative_to(ROOT)} is out of date; run `make unasync`")
        return
    TARGET.write_text(generated, encoding="utf-8")


if __name__ == "__main__":
    main()
