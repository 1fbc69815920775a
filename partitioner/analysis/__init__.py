"""Compiler stage: analysis."""
