"""DPO math: the preference losses, response log-probs, batching/collation, the optimizer step, FSDP2
parallelism and the per-step metric sums. Plain torch; no Ray, no storage."""
