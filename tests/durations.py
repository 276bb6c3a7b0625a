"""Refresh tests/durations.json (the seconds of each work unit, read by conftest.py to schedule the longest first)
from pytest `--junitxml` reports: `python -m tests.durations report.xml [more.xml ...]`. Units a report holds are
replaced, the others kept (one tier's report refreshes that tier); units under 5 s are left out."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from tests.conftest import work_unit


def main(reports: list[str]) -> None:
    seconds: Counter[str] = Counter()
    for report in reports:
        for case in ET.parse(report).iter("testcase"):
            if case.find("skipped") is not None:
                continue
            path = case.get("classname", "").replace(".", "/") + ".py"
            seconds[work_unit(f"{path}::{case.get('name')}")] += float(case.get("time", 0))
    target = Path(__file__).parent / "durations.json"
    known = json.loads(target.read_text()) if target.exists() else {}
    merged = {**{u: s for u, s in known.items() if u not in seconds}, **{u: round(s) for u, s in seconds.items()}}
    out = dict(sorted(((u, s) for u, s in merged.items() if s >= 5), key=lambda item: -item[1]))
    target.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
