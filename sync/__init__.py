"""The sync agent: encrypted replication to a blob store, eviction, lifecycle and recall.

Runs as its own process (`pacs-edge sync`). It shares the data home and the
SQLite index with the appliance, and is the only process that holds cloud
credentials.
"""
