"""Generates the Python stubs of the vectord.v1 contract from ../../proto with grpcio-tools.

    import vectord_stubs
    pb, rpc = vectord_stubs.load()      # the vectord.v1 messages and the service stubs
"""
import atexit
import importlib
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
FILES = ["common", "index", "autotune", "promotion"]


class _Modules:
    """All messages of the package under one name (they are spread over four files)."""

    def __init__(self, modules):
        self._modules = modules

    def __getattr__(self, name):
        for m in self._modules:
            if hasattr(m, name):
                return getattr(m, name)
        raise AttributeError(name)


def load(out_dir=None):
    """Compiles proto/vectord/v1/*.proto into out_dir (a temp dir by default) and imports them.
    Returns (pb, rpc): pb has every message and enum, rpc every *Stub class."""
    from grpc_tools import protoc

    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="vectord-stubs-")
        # The modules are imported by then: the files can go when the process ends.
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    sources = [os.path.join(PROTO_DIR, "vectord", "v1", f + ".proto") for f in FILES]
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
        + sources
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with {code} on {sources}")
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    pbs = [importlib.import_module(f"vectord.v1.{f}_pb2") for f in FILES]
    grpcs = [importlib.import_module(f"vectord.v1.{f}_pb2_grpc") for f in FILES]
    return _Modules(pbs), _Modules(grpcs)
