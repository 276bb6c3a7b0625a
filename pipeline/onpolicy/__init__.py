"""On-policy data: preference pairs built from a model's own samples (`pairs`), and the rounds of iterative DPO
(`rounds`)."""
