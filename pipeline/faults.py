"""Test-only fault injection: crash a process at a named point, to test that crashes lose no finished work.

Set `DPO_PIPELINE_FAULT="point=NAME,token=PATH[,nth=N][,action=exit|raise]"` (several injections: separated by
`;`, each counted and fired on its own). The N-th time (default: first) a
process reaches `reach(NAME)`, and if the file PATH still exists, the file is deleted and the process dies: it
exits at once with code 1 (`exit`, a crash: no cleanup, no exception handlers) or raises `InjectedFault`
(`raise`). Deleting the token first makes a fault fire once over all processes, so a restarted actor or worker
does not crash again. `action=sleep:S` is a slow step instead: every reach sleeps S seconds and appends its start
and end times to PATH. Without the variable `reach` does nothing. This is the only place the variable is read;
`env()` forwards it to Ray actors and workers, which do not inherit the driver's environment.

Points: `scorer_batch` (stage-1 scorer actor, per batch), `shard_written` (stage-1 writer task, between a shard's
data file and its marker), `train_step` (Ray Train worker, after each optimizer
step), `checkpoint_export` (rank 0, a Hugging Face export half written: weights
saved, tokenizer not yet),
`eval_chunk_sampled` (evaluation driver, after an engine wrote a chunk of samples), `eval_target_sampled`
(evaluation driver, after a target's samples are saved), `eval_target_finished` (evaluation
driver, after a target's result.json is written), `pairs_chunk_scored` (pair generation's driver, after a chunk's
pairs are written), `iterate_round_done` (`iterate`, after each round), `state_upload` (Ray Train worker, before
each upload of a training-state checkpoint to run_dir's storage, in Ray Train's upload thread: `adopt` hooks it).
"""

from __future__ import annotations

import os
import time
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
    """In a Ray worker: take over the driver's fault setting (see `env`); with a `state_upload` injection, Ray
    Train's checkpoint uploads in this process pass through `reach("state_upload")` first."""
    os.environ.update(variables)
    if "point=state_upload" in variables.get(VAR, ""):
        from ray.train.v2._internal.execution.storage import StorageContext  # noqa: PLC0415 (test-only)

        persist = StorageContext.persist_current_checkpoint  # the upload of a reported checkpoint

        def reached_first(self, *args, **kwargs):
            reach("state_upload")
            return persist(self, *args, **kwargs)
        StorageContext.persist_current_checkpoint = reached_first


def reach(point: str) -> None:
    for spec in os.environ.get(VAR, "").split(";"):
        fields = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        if fields.get("point") != point:
            continue
        _reached[spec] += 1
        action = fields.get("action", "exit")
        if action.startswith("sleep:"):
            start = time.time()
            time.sleep(float(action.removeprefix("sleep:")))
            with open(fields["token"], "a") as log:
                log.write(f"{start} {time.time()}\n")
            continue
        if _reached[spec] != int(fields.get("nth", 1)):
            continue
        try:
            os.remove(fields["token"])  # only one process wins: the fault fires once
        except (KeyError, FileNotFoundError):
            continue
        if action == "raise":
            raise InjectedFault(f"injected fault at {point}")
        os._exit(1)
