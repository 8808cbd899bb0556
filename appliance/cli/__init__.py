"""The `pacs-edge` command line: the composition root (see root.py)."""

from appliance.cli.root import main

__all__ = ["main"]
