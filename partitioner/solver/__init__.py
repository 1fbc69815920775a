"""Compiler stage: solver."""
