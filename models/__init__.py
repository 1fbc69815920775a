"""Builders of reference models (random weights, no downloads)."""
