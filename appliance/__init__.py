"""pacs-edge appliance: DIMSE server, durable store and SQLite index."""
