"""The generated modules must match proto/csi.proto, and the proto must carry
the spec's wire facts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from csi_lvm.csi import csi_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "--proto_path=csi_lvm/csi=proto",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            f"--mypy_grpc_out=generate_concrete_servicer_stubs,only_sync,quiet:{tmp_path}",
            "csi_lvm/csi/csi.proto",
        ],
        cwd=ROOT,
        check=True,
        # protoc finds mypy-protobuf's plugin on PATH, beside this interpreter
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )  # fmt: skip
    for name in ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py", "csi_pb2_grpc.pyi"):
        fresh = (tmp_path / "csi_lvm" / "csi" / name).read_text()
        committed = (ROOT / "csi_lvm" / "csi" / name).read_text()
        assert fresh == committed, f"csi_lvm/csi/{name} is stale: run `make proto`"


def test_wire_facts_of_the_spec() -> None:
    descriptor = csi_pb2.DESCRIPTOR
    assert descriptor.package == "csi.v1"
    create = descriptor.message_types_by_name["CreateVolumeRequest"]
    numbers = {f.name: f.number for f in create.fields}
    assert numbers == {
        "name": 1, "capacity_range": 2, "volume_capabilities": 3, "parameters": 4,
        "secrets": 5, "volume_content_source": 6, "accessibility_requirements": 7,
        "mutable_parameters": 8,
    }  # fmt: skip
    mode = csi_pb2.VolumeCapability.AccessMode
    assert mode.SINGLE_NODE_MULTI_WRITER == 7 and mode.SINGLE_NODE_SINGLE_WRITER == 6
    services = {s.name for s in descriptor.services_by_name.values()}
    assert {"Identity", "Controller", "Node", "GroupController", "SnapshotMetadata"} <= services
