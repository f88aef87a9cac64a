#!/usr/bin/env bash
# What augserve's one compiled part needs at install time: a C compiler and libjpeg-turbo's headers, for
# the region decoder (augserve/sources/_libjpeg_region.c, built by setup.py). Called by the Makefile
# before it installs the package. Present: nothing to do. Missing on Debian/Ubuntu as root: installed
# with apt (libjpeg-dev is libjpeg-turbo's on both). Otherwise one warning: the package still installs,
# and JPEG regions are decoded by nvImageCodec or OpenCV instead (the same pixels, more slowly).
set -euo pipefail

has_headers() {
    printf '#include <stdio.h>\n#include <jpeglib.h>\n' | "${CC:-cc}" -E -x c - >/dev/null 2>&1
}

has_headers && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing a C compiler and libjpeg-turbo's headers for augserve's region decoder (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev libjpeg-dev >/dev/null
    has_headers && exit 0
fi
echo "warning: no C compiler with libjpeg's headers (Debian/Ubuntu: apt install gcc libjpeg-dev): augserve installs" \
     "without its libjpeg region decoder, and JPEG crops decode more slowly" >&2
