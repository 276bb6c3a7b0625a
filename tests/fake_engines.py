"""Stand-ins for the stages' engine actors, for tests of what the driver does with them (no vLLM); a module of its
own, so that the actors import only this."""

from __future__ import annotations

import os
import time

import pyarrow as pa

from pipeline.engines.actors import SAMPLED, CheckpointEngine


class StandInEngine(CheckpointEngine):
    """The evaluation engine actor without vLLM: sample() gives each prompt completions that depend only on its
    prompt and its per-prompt seed (as vLLM's seeded sampling does), and the engine's pid says who sampled it."""

    def __init__(self, scorer_kwargs, log_path=None, lora=None):
        self.model_dir = scorer_kwargs["model_dir"]

    def shutdown(self) -> None:
        pass

    def sample(self, prompts, seeds, params, first, model_dir=None):
        time.sleep(0.2)  # a call takes a while: the other engines ask for chunks meanwhile
        cols = {f.name: [] for f in SAMPLED}
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            for k in range(params["n"]):
                for name, value in (("prompt_index", first + i), ("sample_index", k),
                                    ("completion_ids", [seed % 97, len(prompt), k, os.getpid()]),
                                    ("token_logps", [-1.0] * 4), ("finish_reason", "length")):
                    cols[name].append(value)
        return {"table": pa.table(cols, schema=SAMPLED), "seconds": 0.2}
