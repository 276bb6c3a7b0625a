"""Stage 3's library: its inputs (prompts, held-out pairs), reference log-probs of samples (cached by content), reward
functions, per-target statistics and summary rows with win rates, and the Markdown/CSV/plot report."""
