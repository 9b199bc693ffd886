"""CI step after pytest: build the report from the committed harness data, print the error summary
at the end of the log, and fail when the calculator's error on the committed data exceeds the bounds
in reports/bounds.toml.

    python -m reports.ci_report [EXTRA.jsonl ...] [--data-dir reports/data] [--out build/report]
                                [--bounds reports/bounds.toml]

EXTRA files (e.g. the ci slice a test run just measured) go into the report but are not held to
the bounds: only committed data (reports/data/*.jsonl) is. With no data at all the report is still
built (its other sections need no measured rows), a note is printed, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.rows import REPO

DATA_DIR = REPO / "reports" / "data"
OUT_DIR = REPO / "build" / "report"
BOUNDS = REPO / "reports" / "bounds.toml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.ci_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("extra", nargs="*", help="extra result files (reported, not bounded)")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="committed results (*.jsonl), held to the bounds")
    parser.add_argument("--out", default=str(OUT_DIR), help="where report.md, charts and CSVs go")
    parser.add_argument("--bounds", default=str(BOUNDS), help="the bounds file")
    parser.add_argument("--accuracy-only", action="store_true", help="only the accuracy section (faster)")
    args = parser.parse_args(argv)

    from reports.accuracy import check_bounds, error_summary_text, load_bounds, summarize
    from reports.report import SECTIONS, build_report

    committed = sorted(str(p) for p in Path(args.data_dir).glob("*.jsonl"))
    extra = [p for p in args.extra if Path(p).is_file()]
    for p in args.extra:
        if p not in extra:
            print(f"ci_report: extra result file {p} not found; ignored")
    sections = ("accuracy",) if args.accuracy_only else SECTIONS
    summary = build_report(committed + extra, args.out, sections=sections)
    df = summary.pop("frame")
    print()
    print(error_summary_text(summary))
    print(f"report: {summary['report']} ({len(summary['files'])} files)")
    if not committed:
        print(f"ci_report: no committed data under {args.data_dir} (*.jsonl) yet; nothing to hold to the bounds")
        return 0
    committed_summary = summarize(df[df["file"].isin(committed)]) if extra else summary
    problems = check_bounds(committed_summary, load_bounds(args.bounds))
    if problems:
        print(f"ci_report: the calculator's error on committed data exceeds {args.bounds}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"ci_report: committed data within the bounds of {Path(args.bounds).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
