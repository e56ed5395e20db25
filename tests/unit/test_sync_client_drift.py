"""The blocking client must be exactly what tools/unasync.py generates from the asyncio one (as the
stubs must be what tools/genproto.py writes), so the two clients cannot drift."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

UNASYNC = ROOT / "tools" / "unasync.py"


def test_sync_client_is_generated_from_the_async_one() -> None:
    result = subprocess.run([sys.executable, str(UNASYNC), "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"_sync.py drifted from _async.py; run `make unasync`:\n{result.stderr}"


def test_both_clients_offer_the_same_methods() -> None:
    from wafer_client import AsyncWaferClient, WaferClient

    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_")}

    # aclose is the asyncio spelling of close (httpx's); the context-manager methods differ by kind.
    assert public(AsyncWaferClient) - {"aclose"} == public(WaferClient)
