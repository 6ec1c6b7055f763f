"""Put on PYTHONPATH by tests/test_rank_imports.py: a process that imports the partitioner's stack fails."""

import importlib.abc
import sys

BLOCKED = ("onnx", "onnx_ir", "sympy", "ml_dtypes", "matplotlib")


class _RefuseHeavyImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"a rank process imported {name!r} (see tests/test_rank_imports.py)")
        return None


sys.meta_path.insert(0, _RefuseHeavyImports())
