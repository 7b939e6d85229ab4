#!/usr/bin/env bash
# DESIGN.md §4 lists every libext2fs call the code makes, and only
# those (tests/design-calls.py).
source "$srcdir/functions.sh"
requires python3 --version
python3 "$srcdir/design-calls.py" "$srcdir/.."
