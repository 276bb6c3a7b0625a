"""Stage 3's outputs: per-checkpoint summary (CSV, JSON), a Markdown report and plots, written atomically.

Also the two small statistics stage 3 computes per checkpoint: `standard_error` and `win_rate`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The object-oriented API, not pyplot: pyplot would need a process-wide `matplotlib.use("Agg")`, which would switch
# the backend of whoever imports this (a notebook, a test), and keeps figures alive until closed. A bare `Figure`
# renders PNGs with Agg, holds no global state and is freed like any object.
from matplotlib.figure import Figure

from pipeline.store.storage import Store

# Column order of summary.csv; the keys every row passed to `write_report` must have (numbers may be None).
SUMMARY_COLUMNS = (
    "name", "path", "step", "samples", "prompts",
    "completion_tokens_mean", "truncated_frac",
    "reward_mean", "reward_se",
    "kl_mean", "kl_se",
    "win_rate", "win_rate_se",
    "pref_accuracy", "pref_margin_mean", "pref_pairs",
    "sampling_s", "sampling_tokens_per_s",
)
KL_LABEL = "KL(π‖π_ref) per sample [nats]"
NONE = "—"


@dataclass
class Report:
    """Paths written by `write_report` (URIs for a remote directory); `plots` holds only the plots that had data."""

    report: Path | str
    csv: Path | str
    json: Path | str
    plots: list[Path | str] = field(default_factory=list)


def standard_error(values) -> float | None:
    """Standard error of the mean: sample std (ddof=1) / sqrt(n); None for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        return None
    return float(x.std(ddof=1) / math.sqrt(x.size))


def win_rate(rewards, baseline) -> tuple[float, float | None]:
    """Paired win rate of `rewards` over `baseline` (equal-length [N] arrays): 1 above, 1/2 tied, 0 below.

    Returns (mean, standard error of that mean over the N pairs).
    """
    r, b = np.asarray(rewards, dtype=np.float64).ravel(), np.asarray(baseline, dtype=np.float64).ravel()
    if r.shape != b.shape or r.size == 0:
        raise ValueError(f"win_rate needs two non-empty arrays of equal length, got {r.size} and {b.size}")
    wins = (r > b) + 0.5 * (r == b)
    return float(wins.mean()), standard_error(wins)


def write_report(eval_dir: Path | str | Store, rows: list[dict], failures: list[dict], settings: dict) -> Report:
    """Writes summary.csv, summary.json, the plots and report.md into `eval_dir` (created): a local directory, or
    any storage through a `Store` (`s3://...`).

    `rows`: one dict per checkpoint with exactly the keys SUMMARY_COLUMNS; `failures`: {name, path, error} dicts;
    `settings`: the evaluation settings, shown in the report and stored in the JSON. Rows are sorted by step
    (checkpoints without a step last, then by name); a plot with no data is neither written nor linked.
    """
    for r in rows:
        missing, extra = set(SUMMARY_COLUMNS) - r.keys(), r.keys() - set(SUMMARY_COLUMNS)
        if missing or extra:
            raise ValueError(f"summary row {r.get('name')!r}: missing keys {sorted(missing)}, unknown keys "
                             f"{sorted(extra)}; rows must have exactly SUMMARY_COLUMNS")
    store = eval_dir if isinstance(eval_dir, Store) else Store(str(eval_dir))
    store.makedirs()
    rows = sorted(rows, key=lambda r: (r["step"] is None, r["step"] or 0, r["name"]))

    plots = []
    for name, (_, draw) in _PLOTS.items():
        fig = draw(rows, settings)
        if fig is None:
            # A plot left over from an earlier run over other checkpoints would now be wrong; the report
            # links only what this call wrote.
            store.delete(name)
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plots.append(_atomic_write(store, name, buf.getvalue()))

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    writer.writerows([["" if r[c] is None else r[c] for c in SUMMARY_COLUMNS] for r in rows])
    csv_path = _atomic_write(store, "summary.csv", out.getvalue().encode())
    doc = {"settings": settings, "checkpoints": rows, "failures": failures}
    json_path = _atomic_write(store, "summary.json",
                              json.dumps(doc, indent=2, ensure_ascii=False, default=_json_default).encode())
    # Last, so that report.md never links a plot that is not there yet.
    md_path = _atomic_write(store, "report.md", _markdown(rows, failures, settings, plots).encode())
    return Report(report=md_path, csv=csv_path, json=json_path, plots=plots)


def _atomic_write(store: Store, name: str, data: bytes) -> Path | str:
    """Written under a temporary name and moved into place (`Store.write_bytes`); the local path, or the URI."""
    store.write_bytes(name, data)
    return Path(store.path(name)) if store.local else f"{store.uri}/{name}"


def _json_default(o):
    # numpy scalars (np.float32, np.int64) from stage 3's statistics; anything else (Paths) as text.
    return o.item() if isinstance(o, np.generic) else str(o)


# ---- Markdown ----

def format_number(x) -> str:
    """3-4 significant digits, no exponent for large magnitudes (token rates), "—" for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NONE
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def format_mean_se(mean, se) -> str:
    """"mean ± se" for tables; "—" for a missing mean."""
    if mean is None:
        return NONE
    return format_number(mean) if se is None else f"{format_number(mean)} ± {float(se):.2g}"


def _cell(text) -> str:
    # A "|" or a newline in a checkpoint name or an error message would break the table/list.
    return " ".join(str(text).split()).replace("|", "\\|")


def _markdown(rows: list[dict], failures: list[dict], settings: dict, plots: list[Path | str]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    lines = ["# Checkpoint evaluation", "", f"Settings: {_cell(shown)}", "",
             "| checkpoint | step | samples | reward | KL [nats] | win rate | pref. accuracy | completion tokens "
             "| tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [_cell(r["name"]), format_number(r["step"]), format_number(r["samples"]),
                 format_mean_se(r["reward_mean"], r["reward_se"]), format_mean_se(r["kl_mean"], r["kl_se"]),
                 format_mean_se(r["win_rate"], r["win_rate_se"]), format_number(r["pref_accuracy"]),
                 format_number(r["completion_tokens_mean"]), format_number(r["sampling_tokens_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    if failures:
        lines += ["", "## Failed", ""]
        lines += [f"- **{_cell(f['name'])}** (`{_cell(f['path'])}`): {_cell(f['error'])}" for f in failures]
    if plots:
        lines += ["", "## Plots"]
        for p in plots:
            name = Path(p).name  # a local path or a URI
            lines += ["", f"![{_PLOTS[name][0]}]({name})"]
    return "\n".join(lines) + "\n"


# ---- plots: each takes the sorted rows and returns a Figure, or None when it has no data ----

def _err(values) -> np.ndarray:
    # A missing standard error draws no bar (NaN), rather than a misleading zero-width one.
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _vs_step(rows: list[dict], key: str, ylabel: str, title: str) -> Figure | None:
    pts = [r for r in rows if r["step"] is not None and r[key] is not None]
    if not pts:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.errorbar([r["step"] for r in pts], [r[key] for r in pts], yerr=_err(r[_SE[key]] for r in pts),
                marker="o", capsize=3)
    ax.set(xlabel="training step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return fig


_SE = {"reward_mean": "reward_se", "kl_mean": "kl_se", "win_rate": "win_rate_se"}


def _reward_label(settings: dict) -> str:
    return f"reward ({settings['reward']})" if settings.get("reward") else "reward"


def _reward_vs_kl(rows: list[dict], settings: dict) -> Figure | None:
    pts = [r for r in rows if r["kl_mean"] is not None and r["reward_mean"] is not None]
    if not pts:
        return None
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    x, y = [r["kl_mean"] for r in pts], [r["reward_mean"] for r in pts]
    ax.errorbar(x, y, xerr=_err(r["kl_se"] for r in pts), yerr=_err(r["reward_se"] for r in pts),
                fmt="o", capsize=3)
    for r, xi, yi in zip(pts, x, y):
        ax.annotate(r["name"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=KL_LABEL, ylabel=f"mean {_reward_label(settings)}", title="Reward vs KL frontier")
    ax.grid(alpha=0.3)
    return fig


def _reward_vs_step(rows, settings):
    return _vs_step(rows, "reward_mean", f"mean {_reward_label(settings)}", "Reward vs training step")


def _win_rate_vs_step(rows, settings):
    vs = f" vs {settings['baseline']}" if settings.get("baseline") else ""
    fig = _vs_step(rows, "win_rate", f"win rate{vs} (ties count 1/2)", "Win rate vs training step")
    if fig is not None:
        ax = fig.axes[0]
        ax.axhline(0.5, linestyle="--", color="gray", linewidth=1)
        ax.set_ylim(0, 1)
    return fig


def _kl_vs_step(rows, settings):
    return _vs_step(rows, "kl_mean", KL_LABEL, "KL to the reference vs training step")


# file name -> (alt text in report.md, drawing function)
_PLOTS = {"reward_vs_kl.png": ("reward vs KL", _reward_vs_kl),
          "reward_vs_step.png": ("reward vs step", _reward_vs_step),
          "win_rate_vs_step.png": ("win rate vs step", _win_rate_vs_step),
          "kl_vs_step.png": ("KL vs step", _kl_vs_step)}
