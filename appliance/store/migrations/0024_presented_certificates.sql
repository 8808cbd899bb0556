-- The expiry of the client certificate each TLS peer last presented, by allowlist
-- name (appliance/store/presented_cert_rows.py). Kept only in serve's memory, it
-- was lost at every restart, and with it the PacsEdgePeerCertificateExpiring
-- alert until the peer called again: a peer whose certificate has expired never
-- can. No PHI: the name is the site's own, the time a certificate field.
CREATE TABLE presented_certificates (
    peer      TEXT PRIMARY KEY,
    not_after REAL NOT NULL
);
