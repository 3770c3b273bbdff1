"""Builds the package with the API's descriptor set made from ../proto (ringattn/_build_proto.py):
the installed package carries ringattn/_generated/ringattn_v1.desc, never a committed copy.
RINGATTN_PROTO_DIR points elsewhere when the package is built outside the repository."""
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _builder():
    spec = importlib.util.spec_from_file_location(
        "ringattn_build_proto", os.path.join(HERE, "ringattn", "_build_proto.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithDescriptor(build_py):
    def run(self):
        super().run()
        builder = _builder()
        proto_dir = os.environ.get("RINGATTN_PROTO_DIR") or os.path.join(HERE, "..", "proto")
        out = os.path.join(self.build_lib, "ringattn", "_generated", builder.DESCRIPTOR_NAME)
        builder.build(out, proto_dir)
        with open(out + ".sha256", "w") as f:
            f.write(builder.proto_digest(proto_dir) + "\n")


setup(cmdclass={"build_py": BuildWithDescriptor})
