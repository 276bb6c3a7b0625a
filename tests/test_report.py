"""Stage 3's report: statistics against hand-worked numbers, and the files `write_report` writes (no Ray, no vLLM)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from pipeline.evaluation import report
from pipeline.evaluation.report import SUMMARY_COLUMNS, standard_error, win_rate, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("reward_vs_kl.png", "reward_vs_step.png", "win_rate_vs_step.png", "kl_vs_step.png")
SETTINGS = {"samples_per_prompt": 4, "max_new_tokens": 64, "temperature": 1.0, "top_p": 0.95, "seed": 0,
            "reward": "lexicon: +good -bad", "baseline": "reference"}


def _row(name, step, **kw) -> dict:
    r = dict.fromkeys(SUMMARY_COLUMNS)
    r.update(name=name, path=f"/ckpt/{name}", step=step, samples=32, prompts=8)
    r.update(kw)
    return r


def _rows() -> list[dict]:
    # Given out of order: the report sorts by step.
    return [
        _row("step_000006", 6, completion_tokens_mean=41.25, truncated_frac=0.125, reward_mean=0.8125,
             reward_se=0.0712, kl_mean=3.4567, kl_se=0.4321, win_rate=0.71875, win_rate_se=0.0795,
             pref_accuracy=0.75, pref_margin_mean=1.234, pref_pairs=16, sampling_s=2.5,
             sampling_tokens_per_s=12345.6),
        _row("reference", 0, completion_tokens_mean=50.0, truncated_frac=0.25, reward_mean=0.25, reward_se=0.05,
             kl_mean=0.0, kl_se=0.0, win_rate=0.5, win_rate_se=0.0, pref_accuracy=0.5, pref_margin_mean=0.0,
             pref_pairs=16, sampling_s=3.0, sampling_tokens_per_s=533.3),
        _row("step_000003", 3, completion_tokens_mean=45.5, truncated_frac=0.0, reward_mean=0.5, reward_se=0.0625,
             kl_mean=1.2, kl_se=0.2, win_rate=0.625, win_rate_se=0.0856, pref_accuracy=0.625,
             pref_margin_mean=0.5, pref_pairs=16, sampling_s=2.75, sampling_tokens_per_s=529.45),
    ]


FAILURE = {"name": "step_000009", "path": "/ckpt/step_000009", "error": "OSError: no model.safetensors"}


def _table(md: str) -> list[str]:
    """Data rows of the Markdown table (header and separator dropped)."""
    return [line for line in md.splitlines() if line.startswith("| ")][1:]


def _parse(value: str, like):
    if value == "":
        return None
    return type(like)(value) if like is not None else value


# ---- statistics ----

def test_standard_error_hand_worked():
    # mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5, var = 5/3, se = sqrt(5/3 / 4)
    assert standard_error([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 12))
    assert standard_error([2.0, 2.0, 2.0]) == 0.0
    assert standard_error([7.0]) is None
    assert standard_error([]) is None


def test_win_rate_counts_ties_as_half():
    # per pair: win, tie, loss, win -> 1, 0.5, 0, 1; mean 0.625;
    # squared deviations .140625+.015625+.390625+.140625 = .6875, var = .6875/3, se = sqrt(var / 4)
    mean, se = win_rate([3, 1, 2, 5], [1, 1, 4, 2])
    assert mean == pytest.approx(0.625)
    assert se == pytest.approx(math.sqrt(0.6875 / 3 / 4))
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == (0.5, 0.0)
    assert win_rate([1.0], [0.0]) == (1.0, None)


def test_win_rate_rejects_unpaired_arrays():
    with pytest.raises(ValueError, match="equal length"):
        win_rate([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        win_rate([], [])


# ---- write_report ----

def test_write_report_files(tmp_path):
    out = tmp_path / "eval"  # does not exist yet
    rep = write_report(out, _rows(), [FAILURE], SETTINGS)

    assert [p.name for p in rep.plots] == list(PLOTS)
    for p in [rep.report, rep.csv, rep.json, *rep.plots]:
        assert p.parent == out and p.is_file() and p.stat().st_size > 0
    for p in rep.plots:
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]  # no temp files left behind

    expected = sorted(_rows(), key=lambda r: r["step"])
    with open(rep.csv, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == SUMMARY_COLUMNS
        back = [{k: _parse(v, ref[k]) for k, v in got.items()} for got, ref in zip(reader, expected, strict=True)]
    assert back == expected

    doc = json.loads(rep.json.read_text())
    assert doc == {"settings": SETTINGS, "checkpoints": expected, "failures": [FAILURE]}


def test_report_markdown(tmp_path):
    rep = write_report(tmp_path, _rows(), [FAILURE], SETTINGS)
    md = rep.report.read_text()

    assert md.startswith("# ")
    assert "max_new_tokens=64" in md and "top_p=0.95" in md and "lexicon: +good -bad" in md
    table = _table(md)
    assert [line.split("|")[1].strip() for line in table] == ["reference", "step_000003", "step_000006"]
    assert table[0] == "| reference | 0 | 32 | 0.25 ± 0.05 | 0 ± 0 | 0.5 ± 0 | 0.5 | 50 | 533.3 |"
    assert table[2] == ("| step_000006 | 6 | 32 | 0.8125 ± 0.071 | 3.457 ± 0.43 | 0.7188 ± 0.08 | 0.75 | 41.25 "
                        "| 12,346 |")

    failed = md.split("## Failed", 1)[1]
    assert "step_000009" in failed and "/ckpt/step_000009" in failed and "OSError: no model.safetensors" in failed
    assert "![reward vs KL](reward_vs_kl.png)" in md
    for name in PLOTS:
        assert f"]({name})" in md


def test_missing_numbers_skip_plots_and_show_dash(tmp_path):
    # Rewards and win rates not computed (e.g. no reward configured); KL still is.
    rows = [_row(r["name"], r["step"], kl_mean=r["kl_mean"], kl_se=r["kl_se"]) for r in _rows()]
    (tmp_path / "reward_vs_step.png").write_bytes(b"stale plot from an earlier run")
    rep = write_report(tmp_path, rows, [], SETTINGS)

    assert [p.name for p in rep.plots] == ["kl_vs_step.png"]
    for name in ("reward_vs_kl.png", "reward_vs_step.png", "win_rate_vs_step.png"):
        assert not (tmp_path / name).exists()
    md = rep.report.read_text()
    assert "Failed" not in md
    assert "](kl_vs_step.png)" in md and "reward_vs" not in md and "win_rate_vs" not in md
    for line in _table(md):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3] == "—" and cells[5] == "—" and cells[6] == "—"  # reward, win rate, pref. accuracy


def test_checkpoint_without_step(tmp_path):
    rows = _rows()[:2] + [_row("external", None, reward_mean=0.9, reward_se=0.1, kl_mean=5.0, kl_se=0.5,
                                win_rate=0.8, win_rate_se=0.07)]
    rep = write_report(tmp_path, rows, [], SETTINGS)

    table = _table(rep.report.read_text())
    assert table[-1].startswith("| external | — | 32 | 0.9 ± 0.1 | 5 ± 0.5 | 0.8 ± 0.07 |")  # sorted last
    with open(rep.csv, newline="") as f:
        assert [r["name"] for r in csv.DictReader(f)] == ["reference", "step_000006", "external"]

    # The plots' data: the frontier includes the step-less checkpoint; the step plots cannot place it.

    sorted_rows = sorted(rows, key=lambda r: (r["step"] is None, r["step"] or 0))
    frontier = report._reward_vs_kl(sorted_rows, SETTINGS).axes[0]
    assert "external" in [t.get_text() for t in frontier.texts]
    for draw in (report._reward_vs_step, report._win_rate_vs_step, report._kl_vs_step):
        ax = draw(sorted_rows, SETTINGS).axes[0]
        assert list(ax.lines[0].get_xdata()) == [0, 6]


def test_rows_must_have_exactly_the_summary_columns(tmp_path):
    bad = _row("reference", 0)
    del bad["kl_mean"]
    bad["extra"] = 1
    with pytest.raises(ValueError, match=r"missing keys \['kl_mean'\], unknown keys \['extra'\]"):
        write_report(tmp_path, [bad], [], SETTINGS)
    assert not list(tmp_path.iterdir())
