-- One random id, kept here and in <store>/.index-id (appliance/store/pairing.py):
-- an index made anew (the file deleted, truncated to 0 bytes, replaced) is told
-- apart from the one the store belongs to, and refused instead of served.
CREATE TABLE index_identity (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    id       TEXT NOT NULL
);
