"""Regenerates the vendored gRPC stubs in src/saga_sdk/_proto from the
workspace's proto/ (the shared wire contract). Run it after the contract
changes; the stubs are committed, so installing the package needs no protoc.

    python scripts/gen_proto.py      # needs grpcio-tools (dev extra)
"""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
OUT = HERE.parent / "src" / "saga_sdk" / "_proto"
FILES = ["saga/v1/coordinator.proto", "saga/v1/participant.proto"]


def main() -> int:
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *FILES,
    ]
    if protoc.main(args) != 0:
        return 1
    # The generated modules import each other as top-level `saga.v1`; make
    # those imports package-relative so the stubs live inside saga_sdk.
    for path in (OUT / "saga" / "v1").glob("*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^from saga\.v1 import", "from saga_sdk._proto.saga.v1 import", text, flags=re.M)
        path.write_text(fixed)
    for pkg in (OUT, OUT / "saga", OUT / "saga" / "v1"):
        (pkg / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
