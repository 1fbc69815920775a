"""Compiler stage: frontend."""
