"""Builds the descriptor set of the public API from proto/ (the package's "stubs").

The package carries no generated *_pb2.py: it loads the serialized FileDescriptorSet of
proto/ringattn/v1/attention.proto and makes the message classes from it at import time
(ringattn/_proto.py). A descriptor set has no protobuf version stamped in it, so one made by any
protoc that takes proto3 `optional` (3.15 or later: grpcio-tools from PyPI, Debian's
protobuf-compiler) works with any protobuf runtime that reads them (4.21 or later).

    python3 python/ringattn/_build_proto.py OUT.desc [--proto_dir proto]

setup.py calls it when the package is built or installed; CMake runs protoc itself into
build/python/ringattn_v1.desc. Stand-alone on purpose: no import of the package.
"""
import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

PROTO_FILE = "ringattn/v1/attention.proto"
DESCRIPTOR_NAME = "ringattn_v1.desc"


def default_proto_dir():
    """proto/ of the source tree this file sits in (python/ringattn/ -> ../../proto)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "proto"))


def proto_digest(proto_dir):
    """sha256 of the .proto source, to tell a descriptor made from other sources."""
    with open(os.path.join(proto_dir, PROTO_FILE), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _protoc_commands():
    """Ways to run protoc, best first: grpcio-tools' bundled protoc, then protoc on PATH."""
    commands = []
    try:
        if importlib.util.find_spec("grpc_tools.protoc") is not None:
            commands.append([sys.executable, "-m", "grpc_tools.protoc"])
    except ImportError:  # no grpc_tools at all
        pass
    protoc = os.environ.get("PROTOC") or shutil.which("protoc")
    if protoc:
        commands.append([protoc])
    return commands


def build(out_path, proto_dir=None):
    """Writes the descriptor set of PROTO_FILE to out_path (atomically). Raises RuntimeError
    naming what was tried when no protoc can make it."""
    proto_dir = proto_dir or default_proto_dir()
    source = os.path.join(proto_dir, PROTO_FILE)
    if not os.path.isfile(source):
        raise RuntimeError(f"ringattn: {source} not found; set --proto_dir to the repository's proto/")
    commands = _protoc_commands()
    if not commands:
        raise RuntimeError(
            "ringattn: no protoc to build the API descriptor: install grpcio-tools "
            "(pip install grpcio-tools) or a protoc >= 3.15 (Debian: protobuf-compiler)")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    errors = []
    for command in commands:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out_path)), suffix=".tmp")
        os.close(fd)
        try:
            result = subprocess.run(
                command + [f"--proto_path={proto_dir}", "--include_imports",
                           f"--descriptor_set_out={tmp}", PROTO_FILE],
                cwd=proto_dir, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(tmp, out_path)
                return out_path
            errors.append(f"{' '.join(command)}: {result.stderr.strip()}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("ringattn: protoc failed on " + source + ":\n" + "\n".join(errors))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="where to write the descriptor set")
    parser.add_argument("--proto_dir", default=None, help="the repository's proto/")
    args = parser.parse_args(argv)
    build(args.out, args.proto_dir)
    print(args.out)


if __name__ == "__main__":
    main()
