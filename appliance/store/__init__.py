"""Durable local storage: the file store (one file per instance) and the SQLite index."""
