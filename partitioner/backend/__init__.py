"""Compiler stage: backend."""
