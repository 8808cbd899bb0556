"""Services: the decisions every network edge shares (permissions, matching, durability).

Edges (appliance/dimse, later hl7 and http) parse, call a service and map its
structured result to their protocol's status; services read and write through
appliance/store and never speak a wire protocol.
"""
