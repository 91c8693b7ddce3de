"""Decode workers: claim bundles, continuous-batch decode, stream tokens back."""
