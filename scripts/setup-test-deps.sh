#!/usr/bin/env bash
# Install the system tools the test suite drives as real DICOM peers.
#
# dcmtk (echoscu, storescu, findscu, movescu, getscu, storescp, dcmconv,
# dcmcjpeg, dcmcjpls, dcmcrle, dcmdump) comes from Debian; apt is skipped when
# storescu is already on PATH. Quiet when everything is present.
# The browser tests drive Debian's chromium through chromium-driver (selenium is told
# where the driver is, so nothing downloads a browser) against the OHIF viewer that
# install-ohif.sh puts in .cache/ohif. promtool comes with Debian's prometheus package.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_command storescu dcmtk
need_command systemd-analyze systemd
need_command chromium chromium
need_command chromedriver chromium-driver
# promtool checks the /metrics text and the example alert rules (docs/operations.md).
need_command promtool prometheus
# libfaketime steps the wall clock of real processes (tests/test_clock_steps.py).
need_command faketime faketime
# curl is the second HTTP client of the web tests (tests/webpeer.py); a minimal Debian
# (debootstrap, a container image) has none.
need_command curl curl
# The power-loss tests mount tests/crashfs.py with FUSE: fusermount3 and libfuse3 (which
# mfusepy loads) come with fuse3; /dev/fuse is the kernel's (tests/test_power_loss.py).
need_command fusermount3 fuse3
"$(dirname "${BASH_SOURCE[0]}")/install-azurite.sh"
"$(dirname "${BASH_SOURCE[0]}")/install-ohif.sh"
