"""Regenerate the gRPC stubs of this folder from proto/omnistream/v1/omnistream.proto (grpcio-tools).

protoc names the schema's module `omnistream.v1.omnistream_pb2` (its path under proto/); the one
import the gRPC module makes of it is rewritten to this package, so the descriptor keeps its
canonical file name (what reflection shows) and the stubs import inside `omnistream.engine`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parents[1] / "proto"
PROTO = "omnistream/v1/omnistream.proto"
GENERATED = ("omnistream_pb2.py", "omnistream_pb2.pyi", "omnistream_pb2_grpc.py")
_IMPORT = "from omnistream.v1 import omnistream_pb2 as"
_PACKAGE_IMPORT = "from omnistream.engine.grpc_gen import omnistream_pb2 as"


def generate() -> dict[str, str]:
    """The generated files' names and contents, from the .proto as it is now."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        argv = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", str(PROTO_ROOT / PROTO)]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        files = {name: (Path(out) / "omnistream" / "v1" / name).read_text() for name in GENERATED}
    grpc_module = files["omnistream_pb2_grpc.py"]
    if grpc_module.count(_IMPORT) != 1:
        raise RuntimeError("unexpected protoc output: the gRPC module's import of the schema module moved")
    files["omnistream_pb2_grpc.py"] = grpc_module.replace(_IMPORT, _PACKAGE_IMPORT)
    return files


def main() -> int:
    for name, text in generate().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
