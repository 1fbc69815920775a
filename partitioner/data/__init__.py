"""Data files shipped with the package (the example system of SPEC §1)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["example_system_path"]


def example_system_path() -> Path:
    """Path of the packaged edge-hub-cloud example system (Pi 3B, Jetson Nano, 1080 Ti)."""
    return Path(__file__).with_name("edge-hub-cloud.toml")
