"""What a Ray Train worker does beside the DPO math: its checkpoints (Hugging Face exports, the sharded training
state saved in the background and reported to Ray Train, restore) and its metrics log (console, JSONL, TensorBoard,
trackers)."""
