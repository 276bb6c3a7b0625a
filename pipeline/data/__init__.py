"""Preference data and the models that read it: sources and shards, row formats and tokenization, resolving and
loading models, tokenizers and chat templates."""
