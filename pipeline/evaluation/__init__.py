"""Evaluation helpers: reward functions, summary statistics and win rates, and the Markdown/CSV/plot report."""
