"""Blob stores: one interface (base.BlobStore), a local folder and Azure Blob Storage."""
