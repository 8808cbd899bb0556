"""Provisioning: creating a data home and its secrets. Imports neither appliance nor sync."""
