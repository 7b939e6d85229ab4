#!/usr/bin/env bash
# The man page is valid POD.
set -e
podchecker "$srcdir/../nbdkit-ext4fs-filter.pod"
