"""sys.path for the Triton Python backend stub (no imports beyond the standard library).

The stub runs Python in isolated mode (PYTHONPATH is ignored): the directory holding numpy
(< 2) and onnxruntime comes from the `pylib_dir` parameter of the model's config.pbtxt, else
from the ASR_TRITON_PYLIB environment variable. It must be on sys.path before anything imports
numpy, so this module reads config.pbtxt with a regular expression rather than a parser.
"""
import os
import re
import sys

PYLIB_ENV = "ASR_TRITON_PYLIB"
_PYLIB_PARAMETER = re.compile(r'key:\s*"pylib_dir"\s*value\s*:?\s*\{\s*string_value:\s*"([^"]*)"')


def add_pylib(config_path: str) -> str:
    """Put the pylib directory (config.pbtxt `pylib_dir`, else $ASR_TRITON_PYLIB) first on
    sys.path; returns it, or "" when neither names an existing directory."""
    candidates = []
    try:
        with open(config_path, encoding="utf-8") as f:
            match = _PYLIB_PARAMETER.search(f.read())
        if match:
            candidates.append(match.group(1))
    except OSError:
        pass
    candidates.append(os.environ.get(PYLIB_ENV, ""))
    for path in candidates:
        if path and os.path.isdir(path):
            if path not in sys.path:
                sys.path.insert(0, path)
            return path
    return ""


def numpy_warning(pylib: str) -> list:
    """Warnings about the stub's numpy (call after add_pylib, once numpy is importable)."""
    import numpy as np

    notes = []
    if not pylib:
        notes.append(f"no pylib_dir parameter / {PYLIB_ENV}: importing numpy/onnxruntime from the system Python")
    if int(np.__version__.split(".")[0]) >= 2:
        notes.append(f"numpy {np.__version__} in the backend stub: the Python backend needs numpy < 2")
    return notes
