"""Services: the decisions every edge shares (permissions, state rules, durability)."""
