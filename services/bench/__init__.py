"""Benchmark clients of the service (`clsa bench ...`)."""
