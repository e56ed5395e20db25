"""The committed stubs must be exactly what `make proto` generates from protos/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "genproto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "server" / "wafer_proto" / "v1"
    fresh = tmp_path / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
    _, mismatch, errors = filecmp.cmpfiles(committed, fresh, names, shallow=False)
    assert not mismatch and not errors, f"stubs drifted from protos/: {mismatch or errors}; run `make proto`"


def test_proto_enums_follow_the_style_guide() -> None:
    """Enum values carry their enum's prefix and zero is *_UNSPECIFIED, for every language's sake."""
    from google.protobuf.descriptor import FileDescriptor

    from wafer_proto.v1 import common_pb2, index_pb2, inference_pb2, jobs_pb2, models_pb2

    files: list[FileDescriptor] = [m.DESCRIPTOR for m in (common_pb2, index_pb2, inference_pb2, jobs_pb2, models_pb2)]
    for file in files:
        for enum in file.enum_types_by_name.values():
            prefix = "".join("_" + c if c.isupper() else c.upper() for c in enum.name).lstrip("_") + "_"
            assert enum.values_by_number[0].name == prefix + "UNSPECIFIED"
            for value in enum.values:
                assert value.name.startswith(prefix), value.name
