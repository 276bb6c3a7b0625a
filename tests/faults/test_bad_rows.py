"""Case 1: bad rows. Every malformed row of the corpus (tests/data/bad_rows.jsonl, reasons in
bad_rows.expected.json, plus a 1 MB response) ends in the rejects file with its reason, the good rows are cached,
the counts are printed and the command exits 0. A file that is not JSONL/Parquet at all, or a missing file: one
line, exit 2."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import DATA, make_config, read_cache

MB_ROW = {"id": "long", "prompt": "tell me everything.", "chosen": "word " * 200_000, "rejected": "no."}


@pytest.mark.ray
def test_bad_rows_are_rejected_with_reasons_counted_and_the_run_goes_on(tiny_model, tmp_path, ray_local, capsys):
    expected = json.loads((DATA / "bad_rows.expected.json").read_text()) + [None]
    data = tmp_path / "bad_rows.jsonl"
    data.write_bytes((DATA / "bad_rows.jsonl").read_bytes() + json.dumps(MB_ROW).encode() + b"\n")
    assert len(json.dumps(MB_ROW)) > 1_000_000
    cfg = make_config(tiny_model, tmp_path, "scoring.engine=hf", "scoring.shard_size=4", data=data)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    code = main(["cache", str(cfg_file)])  # in this process: its Ray instance is already up
    out, err = capsys.readouterr()
    assert code == 0, err
    reasons = Counter(e for e in expected if e)
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
    assert (f"[train] rows {len(expected)}, pairs {expected.count(None)}, rejected {sum(reasons.values())} "
            f"({shown}); rejects in") in out, out

    (key_dir,) = Path(cfg.cache_dir).glob("*/manifest.json")
    rejects = [json.loads(line) for line in open(key_dir.parent / "rejects.jsonl")]
    assert {x["index"]: x["reason"] for x in rejects} == {i: e for i, e in enumerate(expected) if e}
    assert all(x["detail"] for x in rejects)
    dup = next(x for x in rejects if x["index"] == 23)
    assert dup["id"] == "dup" and "already used by row 18" in dup["detail"] and dup["row"]["chosen"].endswith("!")
    table = read_cache(SimpleNamespace(uri=str(key_dir.parent)))
    ids = table.column("id").to_pylist()
    assert ids == [str(i) if i != 18 else "dup" for i, e in enumerate(expected[:-1]) if e is None] + ["long"]
    assert len(set(ids)) == len(ids)
    long = table.to_pylist()[-1]  # the 1 MB response is cut on the right to data.max_length
    assert len(long["prompt_input_ids"]) + len(long["chosen_input_ids"]) == cfg.data.max_length
    manifest = json.loads((key_dir).read_text())
    assert manifest["counts"]["pairs"] == table.num_rows and sum(f["rows"] for f in manifest["files"]) == len(ids)


@pytest.mark.parametrize("name, content, needle", [
    ("rows.jsonl", b"id,prompt,chosen,rejected\n1,a,b,c\n2,d,e,f\n", "is not JSON Lines: none of its first 3 line(s)"),
    ("rows.jsonl", bytes(range(256)) * 64, "is not JSON Lines"),
    ("rows.parquet", b"PAR1 this is not parquet", "is not a readable Parquet file"),
    ("rows.csv", b"a,b\n", "has an unsupported extension; use .jsonl, .json or .parquet"),
    ("missing.jsonl", None, "not found; check data.*.path"),
])
def test_a_file_that_is_not_data_is_one_line_exit_2(name, content, needle, tiny_model, tmp_path, capsys):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    code = main(["cache", "configs/tiny.yaml", f"model.path={tiny_model}", f"data.train.path={path}",
                 f"cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing written
