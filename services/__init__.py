"""CLSA serving: engine, workers, gateway and the CLI."""
