-- Which transfer syntaxes each SOP class is stored in: an index-only scan for
-- C-GET negotiation (see appliance/dimse/negotiation.py).
CREATE INDEX instances_class_syntax ON instances(sop_class_uid, transfer_syntax);
