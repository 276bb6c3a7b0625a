"""Refresh tests/durations.json (the seconds of each work unit, read by conftest.py to schedule the longest first)
from a pytest `--junitxml` report: `python -m tests.durations report.xml`. Units under 5 s are left out."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from tests.conftest import work_unit


def main(report: str) -> None:
    seconds: Counter[str] = Counter()
    for case in ET.parse(report).iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        seconds[work_unit(f"{path}::{case.get('name')}")] += float(case.get("time", 0))
    out = {unit: round(s) for unit, s in seconds.most_common() if s >= 5}
    (Path(__file__).parent / "durations.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
