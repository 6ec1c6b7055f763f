"""models/make_synthetic.py run inside the test process: the same command line (`main(argv)`: its flags, presets
and checks) without a second interpreter that imports numpy and onnx again (a second or two per model); and
`script_module`, how tests load any of the repository's scripts (models/, bench/) as a module."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

MAKE_SYNTHETIC = Path(__file__).resolve().parents[1] / "models" / "make_synthetic.py"


def script_module(path: Path, *, register: bool = False) -> ModuleType:
    """The script at `path` loaded as a module named after its file; with `register`, also in sys.modules
    (a script whose dataclasses look their module up while the class is built needs it)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def synthetic_module() -> ModuleType:
    """The generator's module, loaded once per process (other tests load it under the same name)."""
    return sys.modules.get("make_synthetic") or script_module(MAKE_SYNTHETIC, register=True)


def make_synthetic(out: Path, *flags: str) -> Path:
    """`make_synthetic.py --out OUT FLAGS...`; returns OUT/model.onnx. Its one summary line is kept off the
    test's output, as the subprocess's captured stdout was."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert synthetic_module().main(["--out", str(out), *flags]) == 0
    return out / "model.onnx"
