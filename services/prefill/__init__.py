"""Prefill workers: run prompts, publish each KV bundle by Ray object handle."""
