"""Inference helpers: streaming generation from a base model plus adapters."""
