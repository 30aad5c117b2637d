#!/usr/bin/env python
"""Check that a finished pipeline run filled every method's entry of every table (CI runs it after
`make demo`).

    python tools/check_report.py runs/toy/summary.json

Exit 0 when every method row of every table holds a number; 1 (listing the empty entries and the
failed stages) otherwise; 2 when the file is not a pipeline summary.
"""

import json
import sys
from pathlib import Path

from mixup_transfer.core import cli
from mixup_transfer.core.data import InputError
from mixup_transfer.pipeline.report import missing_entries


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("summary", help="summary.json of a pipeline run (runs/<name>/summary.json)")
    args = p.parse_args(argv)
    try:
        summary = json.loads(Path(args.summary).read_text())
        tables = summary["tables"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{args.summary}: not a pipeline summary.json "
                         f"({type(e).__name__}: {e})") from e
    missing, failed = missing_entries(summary), summary.get("failed") or {}
    for label, why in failed.items():
        print(f"failed stage {label}: {why}", file=sys.stderr)
    for entry in missing:
        print(f"empty entry {entry}", file=sys.stderr)
    if missing or failed:
        print(f"error: {args.summary}: {len(missing)} empty method entries, {len(failed)} failed "
              "stages",
              file=sys.stderr)
        return 1
    rows = sum(1 for t in tables.values() for r in t["rows"].values() if not r["baseline"])
    print(f"{args.summary}: {len(tables)} tables, {rows} method rows, every entry filled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
