"""The HTTPS edge: DICOMweb (PS3.18), the viewer and its login, on one origin.

    https_server.py    the listener: TLS, connection cap, slow-head and idle timers
    app.py             build_app(): the aiohttp Application with every route module
    auth.py            the middleware: HTTP Basic or session cookie -> Principal
    dicomweb_*.py      QIDO-RS, WADO-RS and STOW-RS under /dicom-web

Edges translate; services decide (docs/architecture.md): these modules parse
requests, call appliance.services and map results to HTTP statuses. docs/web.md
is the operator's and integrator's page.
"""
