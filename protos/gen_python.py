"""Generate the gateway's Python protobuf/gRPC modules from protos/ (``make proto``).

The output (``gateway/ner_gateway/pb/``) is not committed: ``pip install`` runs this script
through setup.py, so the code always matches the .proto files in the checkout.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "gateway" / "ner_gateway" / "pb"


def main() -> int:
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    OUT.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={OUT}",
            f"--pyi_out={OUT}", f"--grpc_python_out={OUT}", *protos]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for path in OUT.rglob("*_pb2*.py"):
        # protoc writes absolute imports (`from ner.v1 import ner_pb2`); make them
        # relative so the modules live inside the ner_gateway package.
        text = path.read_text()
        text = re.sub(r"^from ner\.v1 import (\w+_pb2)", r"from . import \1", text, flags=re.M)
        path.write_text(text)
    for directory in [OUT, *[p for p in OUT.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
        (directory / "__init__.py").touch()
    print(f"generated {', '.join(protos)} into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
