#!/usr/bin/env python3
"""Every libext2fs call in the code is in DESIGN.md §4's table.

Calls are identifiers ext2fs_* / io_channel_* followed by '(' in
filter/, journal/ and io-manager/ *.c, with comments and strings
removed.  The table's backticked names may abbreviate: `a_b_c/d/e`
(a_b_d, a_b_e), `..._x` (the previous name's stem + _x), `a_*` (any
name starting with a_).  Exit 1, listing what is missing, if a call is
not in the table; names in the table that the code no longer calls are
listed too (and fail), so the table stays true both ways.
"""
import re, sys, glob, os

top = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")

def strip(src):
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    src = re.sub(r"//[^\n]*", " ", src)
    src = re.sub(r'"(\\.|[^"\\])*"', '""', src)
    return src

calls = {}
for d in ("filter", "journal", "io-manager"):
    for f in sorted(glob.glob(os.path.join(top, d, "*.c"))):
        for m in re.finditer(r"\b((?:ext2fs|io_channel)_[a-z0-9_]+)\s*\(", strip(open(f).read())):
            calls.setdefault(m.group(1), set()).add(os.path.relpath(f, top))

design = open(os.path.join(top, "DESIGN.md")).read()
sec = design[design.index("## 4."):design.index("## 5.")]
names, prefixes = set(), []
for line in sec.splitlines():
    if not line.startswith("|"):
        continue
    cell = line.split("|")[1]
    prev = None
    for tok in re.findall(r"`([^`]+)`", cell):
        tok = tok.split()[0].rstrip(",")
        parts = tok.split("/")
        first = parts[0]
        if first.startswith("...") and prev:
            first = prev.rsplit("_", 1)[0] + first[3:]
        if not re.match(r"(ext2fs|io_channel)_", first):
            continue
        stem = first.rsplit("_", 1)[0] + "_"
        for i, p in enumerate(parts):
            n = first if i == 0 else (p if p.startswith(("ext2fs_", "io_channel_")) else stem + p)
            if n.endswith("*"):
                prefixes.append(n[:-1])
            else:
                names.add(n)
        prev = first

def listed(c):
    return c in names or any(c.startswith(p) for p in prefixes)

missing = sorted(c for c in calls if not listed(c))
stale = sorted(n for n in names if n not in calls)
for c in missing:
    print("not in DESIGN.md §4: %s (%s)" % (c, ", ".join(sorted(calls[c]))))
for n in stale:
    print("in DESIGN.md §4 but never called: %s" % n)
print("%d libext2fs calls, %d missing from the table, %d stale rows" %
      (len(calls), len(missing), len(stale)))
sys.exit(1 if missing or stale else 0)
