"""Reward functions for tests/test_rewards.py, imported as `tests.reward_fixtures:<name>` like a user's module."""

CALLS = []  # (prompts, completions, kwargs) of each count_char call, so tests can see what was passed


def count_char(prompts, completions, char="a"):
    CALLS.append((list(prompts), list(completions), {"char": char}))
    return [c.count(char) for c in completions]


def prompt_length(prompts, completions):
    return [len(p) for p in prompts]


def too_few(prompts, completions):
    return [1.0] * (len(completions) - 1)


def not_a_list(prompts, completions):
    return 3.0


def with_nan(prompts, completions):
    return [float("nan")] * len(completions)


def with_string(prompts, completions):
    return ["1.0"] * len(completions)


def raises(prompts, completions):
    raise ZeroDivisionError("bug in the user's reward")


NOT_CALLABLE = 42
