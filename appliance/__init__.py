"""pacs-edge appliance: DIMSE server, durable store and SQLite index."""

__version__ = "0.1.0"
