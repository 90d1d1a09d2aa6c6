"""One capture-range table from several records of the same seeded cases (methods measured in
different invocations, e.g. the slow ones on one core while the others ran on the other):

    python benchmarks/merge_capture_range.py FIRST.json SECOND.json [MORE.json ...] [--same-cases] [--out MERGED.json]

Records may hold different pairs.  Where two records hold the same (pair, bin, case), its drawn
initial error must agree (the same seeded truth), or the merge is refused: runs of different cases
never share a row; a run of the same method on the same cell in two records is kept once, from the
first record that has it.  ``--methods`` keeps only the methods named.  ``--same-cases`` keeps only
the (pair, bin, case) cells that every record holding that pair reached (a record of 10 cases per
bin merged with one of 20 keeps the first 10).  Times come from the runs as recorded; when the
records used different thread counts the table says so.
``disa_capture_range.py --table`` prints a single record.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from disa_capture_range import markdown_table, summarise, write_json  # noqa: E402


def completed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "error" not in r]  # crashed runs are not results


def _cell(item: dict) -> tuple:
    return item["pair"], item["bin"], item["case"]


def merge(records: list[dict], same_cases: bool = False, only: list[str] | None = None) -> dict:
    """The records' runs as one record: the first record's settings, every record's methods, pairs and
    cases (those kept)."""
    cases: dict[tuple, dict] = {}  # (pair, bin, case) → the first record's case there
    for k, record in enumerate(records):
        for case in record.get("cases", []):
            cell = _cell(case)
            first_seen = cases.setdefault(cell, case)
            if abs(first_seen["initial_mm"] - case["initial_mm"]) > 1e-6:
                raise SystemExit(f"record {k + 1} holds another case at {cell} (initial error {case['initial_mm']:.3f} "
                                 f"mm, not {first_seen['initial_mm']:.3f} mm): different seeds or settings; not merged")
    runs, seen = [], set()
    for record in records:
        for r in completed(record["runs"]):
            key = (*_cell(r), r["method"])
            if key not in seen and (only is None or r["method"] in only):
                seen.add(key)
                runs.append(r)
    if same_cases:
        by_pair: dict[str, set] = {}
        for record in records:
            cells = {_cell(c) for c in record.get("cases", [])} or {_cell(r) for r in completed(record["runs"])}
            for pair in {c[0] for c in cells}:
                mine = {c for c in cells if c[0] == pair}
                by_pair[pair] = by_pair[pair] & mine if pair in by_pair else mine
        runs = [r for r in runs if _cell(r) in by_pair.get(r["pair"], set())]
        cases = {cell: case for cell, case in cases.items() if cell in by_pair.get(cell[0], set())}
    methods, pairs = [], []
    for record in records:
        methods += [m for m in record["args"]["methods"] if m not in methods and (only is None or m in only)]
        pairs += [p for p in record["args"]["pairs"] if p not in pairs]
    first = records[0]
    args = {**first["args"], "methods": methods, "pairs": pairs}
    for record in records:  # LC²'s own limits from the record that ran it
        if "lc2-local" in record["args"]["methods"]:
            args.update({k: v for k, v in record["args"].items() if k.startswith("lc2_")})
            break
    return {**first, "runs": runs, "args": args, "cases": list(cases.values()),
            "summary": summarise(runs, pairs, methods)}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path, nargs="+")
    ap.add_argument("--same-cases", action="store_true")
    ap.add_argument("--methods", help="comma-separated: keep only these methods")
    ap.add_argument("--out", type=Path, help="also write the merged record here")
    args = ap.parse_args(argv)
    if len(args.records) < 2:
        ap.error("give at least two records")
    only = args.methods.split(",") if args.methods else None
    records = [json.loads(p.read_text()) for p in args.records]
    merged = {**merge(records, args.same_cases, only), "merged_from": [str(p) for p in args.records]}
    if args.out:
        write_json(merged, args.out)
    table = markdown_table(merged)
    threads = {r.get("args", {}).get("threads") for r in records}
    if len(threads) > 1:
        table += (f"\n- The merged records ran with different thread counts ({sorted(threads)}) and possibly "
                  "under different loads: compare times only within one record.")
    print(table)
    return table


if __name__ == "__main__":
    main()
