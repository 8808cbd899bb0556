"""HL7 v2 over MLLP: the order feed from the RIS (listener, message translation, ACKs)."""
