"""One capture-range table from two records of the same pairs and seeded cases (disjoint methods,
e.g. a method measured in a later invocation):

    python benchmarks/merge_capture_range.py FIRST.json SECOND.json [--same-cases]

``--same-cases`` keeps, for every method, only the (case, bin) cells the second record reached
(a second run stopped early).  ``disa_capture_range.py --table`` prints a single record.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from disa_capture_range import markdown_table, summarise  # noqa: E402


def completed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "error" not in r]  # crashed runs are not results


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    ap.add_argument("--same-cases", action="store_true")
    args = ap.parse_args(argv)
    first, second = json.loads(args.first.read_text()), json.loads(args.second.read_text())
    runs = completed(first["runs"]) + completed(second["runs"])
    if args.same_cases:
        cells = {(r["case"], r["bin"]) for r in completed(second["runs"])}
        runs = [r for r in runs if (r["case"], r["bin"]) in cells]
    methods = first["args"]["methods"] + [m for m in second["args"]["methods"] if m not in first["args"]["methods"]]
    pairs = first["args"]["pairs"]
    merged = {**first, "runs": runs, "args": {**first["args"], "methods": methods},
              "summary": summarise(runs, pairs, methods)}
    table = markdown_table(merged)
    print(table)
    return table


if __name__ == "__main__":
    main()
