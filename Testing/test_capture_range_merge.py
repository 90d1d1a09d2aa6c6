"""benchmarks/merge_capture_range.py: runs of several records share a table only on identical cases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from merge_capture_range import merge  # noqa: E402


def _record(pair: str, methods: list[str], cases: int, initial: float = 10.0, error: float = 0.5) -> dict:
    cells = [{"pair": pair, "bin": 0, "case": i, "initial_mm": initial + i} for i in range(cases)]
    runs = [{"pair": pair, "bin": 0, "case": i, "method": m, "success": error < 2, "error_mm": error,
             "seconds": 1.0, "evaluations": 10} for i in range(cases) for m in methods]
    return {"args": {"pairs": [pair], "methods": methods, "out": f"{pair}.json"}, "cases": cells, "runs": runs}


def test_records_of_the_same_cases_merge_and_duplicates_count_once():
    twenty = _record("t2", ["sitk-mattes"], 20)
    ten = _record("t2", ["mind-local", "sitk-mattes"], 10, error=3.0)  # its sitk runs repeat the first record's
    ct = _record("ct", ["mind-local"], 10)
    merged = merge([twenty, ten, ct], same_cases=True)
    assert merged["args"]["pairs"] == ["t2", "ct"]
    t2 = merged["summary"]["t2"]["methods"]
    assert t2["sitk-mattes"]["cases"] == 10 and t2["sitk-mattes"]["successes"] == 10  # first record's runs, 10 cells
    assert t2["mind-local"]["cases"] == 10 and t2["mind-local"]["successes"] == 0
    assert merged["summary"]["ct"]["methods"]["mind-local"]["cases"] == 10
    assert sorted((c["pair"], c["case"]) for c in merged["cases"]) == sorted(
        [("ct", i) for i in range(10)] + [("t2", i) for i in range(10)])  # the cases of the kept cells, every pair
    assert merge([twenty, ten], same_cases=False)["summary"]["t2"]["methods"]["sitk-mattes"]["cases"] == 20
    only = merge([twenty, ten], same_cases=True, only=["mind-local"])
    assert list(only["summary"]["t2"]["methods"]) == ["mind-local"]


def test_records_of_different_cases_are_refused():
    with pytest.raises(SystemExit, match="another case"):
        merge([_record("t2", ["sitk-mattes"], 5), _record("t2", ["mind-local"], 5, initial=11.5)])
