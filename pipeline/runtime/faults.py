"""Test-only fault injection: crash a process at a named point, to test that crashes lose no finished work.

Set `DPO_PIPELINE_FAULT="point=NAME,token=PATH[,nth=N][,action=exit|raise]"` (several injections: separated by
`;`, each counted and fired on its own). The N-th time (default: first) a
process reaches `reach(NAME)`, and if the file PATH still exists, the file is deleted and the process dies: it
exits at once with code 1 (`exit`, a crash: no cleanup, no exception handlers) or raises `InjectedFault`
(`raise`). Deleting the token first makes a fault fire once over all processes, so a restarted actor or worker
does not crash again. Without the variable `reach` does nothing. This is the only place the variable is read;
`env()` forwards it to Ray actors and workers, which do not inherit the driver's environment.

Points: `scorer_batch` (stage-1 scorer actor, per batch), `shard_written` (stage-1 writer task, between a shard's
data file and its marker), `train_step` (Ray Train worker, after each optimizer
step), `checkpoint_export` (rank 0, a Hugging Face export half written: weights
saved, tokenizer not yet),
`eval_chunk_sampled` (evaluation driver, after an engine wrote a chunk of samples), `eval_target_sampled`
(evaluation driver, after a target's samples are saved), `eval_target_finished` (evaluation
driver, after a target's result.json is written), `pairs_chunk_scored` (pair generation's driver, after a chunk's
pairs are written), `iterate_round_done` (`iterate`, after each round).
"""

from __future__ import annotations

import os
from collections import Counter

VAR = "DPO_PIPELINE_FAULT"
# Times each injection (its whole setting: point, token, nth) was reached in this process. Keyed per injection, not
# per point: a process that runs many injections one after another (a test session) counts each from zero.
_reached: Counter[str] = Counter()


class InjectedFault(RuntimeError):
    """Raised by a fault with `action=raise`."""


def env() -> dict[str, str]:
    """The variable, to pass on to Ray actors and workers (empty when unset)."""
    return {VAR: os.environ[VAR]} if os.environ.get(VAR) else {}


def adopt(variables: dict[str, str]) -> None:
    """In a Ray worker: take over the driver's fault setting (see `env`)."""
    os.environ.update(variables)


def reach(point: str) -> None:
    for spec in os.environ.get(VAR, "").split(";"):
        fields = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        if fields.get("point") != point:
            continue
        _reached[spec] += 1
        if _reached[spec] != int(fields.get("nth", 1)):
            continue
        try:
            os.remove(fields["token"])  # only one process wins: the fault fires once
        except (KeyError, FileNotFoundError):
            continue
        if fields.get("action", "exit") == "raise":
            raise InjectedFault(f"injected fault at {point}")
        os._exit(1)
