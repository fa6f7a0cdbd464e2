"""Orchestration reusable from Python: the quickstart, the speculative comparison, the decode benchmark."""
