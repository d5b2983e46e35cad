"""`moestream`: the entry point. Each command module joins the group defined in cli/app.py."""

from __future__ import annotations

from . import bench, chat, generate, plan, report, serve  # noqa: F401  (each registers its command)
from .app import cli

__all__ = ["cli"]
