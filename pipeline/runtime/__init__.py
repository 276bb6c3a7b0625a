"""Runtime plumbing: connecting to Ray, progress bars and quiet worker logs, the multi-node shared-storage check,
and test-only fault injection."""
