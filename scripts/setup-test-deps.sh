#!/usr/bin/env bash
# Install the system tools the test suite drives as real DICOM peers.
#
# dcmtk (echoscu, storescu, findscu, movescu, getscu, storescp, dcmconv,
# dcmcjpeg, dcmcjpls, dcmcrle, dcmdump) comes from Debian; apt is skipped when
# storescu is already on PATH. Quiet when everything is present.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_command storescu dcmtk
need_command systemd-analyze systemd
"$(dirname "${BASH_SOURCE[0]}")/install-azurite.sh"
