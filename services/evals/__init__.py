"""Quality evals that compare CLSA with dense attention on the same weights (issue #5)."""
