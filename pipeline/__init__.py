"""dpo-pipeline: Direct Preference Optimization with a cached reference, on Ray."""

__version__ = "0.1.0"
