"""``report.json``: a result's figures, times, device and versions as strict, portable JSON.

Values a registration naturally produces (numpy scalars and arrays, torch tensors, paths, NaN or
infinite similarities, dataclasses, enums) are converted to plain JSON; a non-finite float becomes
``null`` so that every JSON reader (including strict ones) accepts the file.  The file is written
atomically: a failed write leaves an earlier ``report.json`` untouched.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import os
import sys
from pathlib import Path, PurePath
from typing import Any

from ..fileio import atomic_output, check_output_path

__all__ = ["to_jsonable", "write_report_json"]


def _float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def to_jsonable(obj: Any, _active: frozenset[int] = frozenset()) -> Any:
    """A copy of ``obj`` made only of dict/list/str/int/float/bool/None, safe for ``json.dump``.

    numpy scalars and arrays, torch tensors → numbers and nested lists; NaN/±Inf → ``None``;
    paths → strings; sets/tuples → lists; dataclasses → dicts; enums → their value; dict keys →
    strings; anything else → ``str(obj)``.  A reference cycle becomes the string ``"<cycle>"``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _float(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, _active)
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()

    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return _float(obj)
        if isinstance(obj, np.complexfloating):
            return [_float(obj.real), _float(obj.imag)]
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                return [to_jsonable(v, _active) for v in obj.tolist()]
            return to_jsonable(obj.tolist(), _active)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist(), _active)
    if isinstance(obj, complex):
        return [_float(obj.real), _float(obj.imag)]

    # containers: guard against reference cycles
    if id(obj) in _active:
        return "<cycle>"
    active = _active | {id(obj)}
    if isinstance(obj, dict):
        return {_key(k): to_jsonable(v, active) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, active) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v, active) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), active) for f in dataclasses.fields(obj)}
    return str(obj)


def _key(key: Any) -> str:
    """JSON object keys are strings; numbers and numpy scalars keep their natural spelling."""
    if isinstance(key, str):
        return key
    value = to_jsonable(key)
    return value if isinstance(value, str) else json.dumps(value)


def write_report_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented UTF-8 JSON at ``path`` (atomically); returns the path."""
    out = check_output_path(path)
    clean = to_jsonable(data)
    with atomic_output(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(clean, handle, indent=2, ensure_ascii=False, allow_nan=False)
            handle.write("\n")
    return out
