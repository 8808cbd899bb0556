"""Provisioning: creating a data home and its secrets.

Imports only the base floor (appliance.base: errors, the durable write), never
the appliance's store, services or edges, nor the sync agent.
"""
