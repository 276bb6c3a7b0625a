"""The three stages, one module each, each runnable alone (`dpo-pipeline cache|train|eval`): `cache` (stage 1,
the reference log-prob cache), `train` (stage 2, DPO on Ray Train + FSDP2), `evaluate` (stage 3, vLLM sampling).
A stage imports the library (`pipeline/` subpackages), never another stage; the CLI and `orchestrate` import them."""
