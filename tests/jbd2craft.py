#!/usr/bin/env python3
"""jbd2craft: write jbd2 transactions straight into the internal journal
(inode 8) of an ext2/3/4 image, for replay tests.

It needs nothing but Python 3 (no libnbd, no e2fsprogs).  The journal's
block map is read from inode 8 (an extent tree, or direct/indirect
blocks as on ext3 and on filesystems without extents).  The log is
written as the kernel's jbd2 would write it: descriptor blocks with
their tags followed by the logged copies, revoke blocks, one commit
block per transaction, laid out circularly over [s_first, s_maxlen).
Then the journal superblock gets s_start/s_sequence, the features
(REVOKE, 64BIT, CSUM_V2/V3 or the v1 COMPAT_CHECKSUM) and its checksum,
and the ext4 superblock gets needs_recovery (with its checksum fixed on
metadata_csum filesystems).  Nothing else in the image is touched.

Command line (run with -h for all options):

  jbd2craft.py IMG [OPTIONS] [TXN ...]
  jbd2craft.py IMG --info          # journal geometry as JSON
  jbd2craft.py IMG --diff-to-file IMG2 FILE   # block list for debugfs jw -b

Each TXN argument is one transaction, a comma-separated list of items:

  BLK=FILE[@OFF]   log filesystem block BLK with one block of FILE read at
                   byte offset OFF (default 0; a short read is padded
                   with zeros)
  BLK=img:IMG2     log block BLK with its contents in IMG2 (same geometry)
  diff:IMG2        log every block (outside the journal) that differs
                   between IMG2 and the image "as of the previous
                   transactions" (IMG, plus what earlier diff: items
                   logged): chain diff:B1 diff:B2 for states A->B1->B2
  BLK=zero         log a block of zeros; BLK=fill:0xNN one of byte NN
  revoke:BLK[-BLK2]  revoke a block (or a range)
  torn             write no commit block (a torn tail: must be ignored)
  badcommit        a commit block whose checksum is wrong
  badtag           the first logged copy no longer matches its tag
                   checksum (v2/v3: a corrupt data block in the log)
  baddesc          a wrong descriptor tail checksum (v2/v3)
  badrevoke        a wrong revoke tail checksum (v2/v3)
  hugerevoke       a revoke block whose byte count is 0xFFFFFFF0
  loop             instead of data, a chain of descriptor blocks whose
                   tags cover the whole log, so that the scan comes back
                   to the first descriptor with the same tid: a log that
                   loops
  BLK is a number, or j:N for the block holding journal block N (tags
  pointing at the journal itself).

A logged block whose first 4 bytes are the jbd2 magic is escaped
automatically (zeroed in the log, ESCAPE tag flag).  Revokes written
with items of several transactions follow the kernel's rules: a block
logged in transaction T is not replayed if a transaction >= T revokes
it.

Damage to the journal superblock after writing: --hostile KIND, one of
csum, blocksize, maxlen, first0, firstpast, startpast, v2v3, v1v3,
incompat, blocktype, csumtype, nrusers.

As a module: Image, Journal, Txn and crc32c()/crc32_be(); see
Journal.write().

All checksums are raw crc32c (Castagnoli, reflected, no final
inversion), as ext2fs_crc32c_le computes them:
  journal superblock: crc32c(~0, 1024 bytes with s_checksum zero)
  seed = crc32c(~0, s_uuid)
  commit: crc32c(seed, block with h_chksum[0] zero)
  descriptor/revoke tail: crc32c(seed, block with the tail zero)
  tag: crc32c(crc32c(seed, be32 tid), logged bytes); v2 keeps 16 bits
v1 (COMPAT_CHECKSUM): the commit holds crc32_be(~0, ...) over every
descriptor and logged block of the transaction, type 1, size 4.
"""

import argparse
import json
import os
import struct
import sys

JBD2_MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SB_V1, SB_V2, REVOKE = 1, 2, 3, 4, 5
FLAG_ESCAPE, FLAG_SAME_UUID, FLAG_DELETED, FLAG_LAST_TAG = 1, 2, 4, 8
INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_ASYNC = 0x1, 0x2, 0x4
INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3 = 0x8, 0x10
COMPAT_CHECKSUM = 0x1

EXT4_INCOMPAT_RECOVER = 0x4
EXT4_INCOMPAT_64BIT = 0x80
EXT4_RO_COMPAT_METADATA_CSUM = 0x400
EXT4_EXTENTS_FL = 0x80000

# ---------------------------------------------------------------------
# Checksums.


def _crc32c_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_CRC32C = _crc32c_table()


def crc32c(seed, data):
    """Raw crc32c as ext2fs_crc32c_le(seed, data): no pre/post inversion."""
    c = seed & 0xFFFFFFFF
    t = _CRC32C
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c


def _crc32be_table():
    t = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else c << 1
        t.append(c & 0xFFFFFFFF)
    return t


_CRC32BE = _crc32be_table()


def crc32_be(seed, data):
    """The kernel's crc32_be (journal checksum v1), no inversion."""
    c = seed & 0xFFFFFFFF
    t = _CRC32BE
    for b in data:
        c = ((c << 8) & 0xFFFFFFFF) ^ t[((c >> 24) ^ b) & 0xFF]
    return c


# ---------------------------------------------------------------------
# The filesystem: superblock, inodes, block maps.


class CraftError(Exception):
    pass


class Image:
    def __init__(self, path):
        self.path = path
        self.f = open(path, "r+b")
        self.f.seek(1024)
        sb = self.f.read(1024)
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
            raise CraftError("%s: not an ext2/3/4 filesystem" % path)
        self.sb = bytearray(sb)
        u32 = lambda o: struct.unpack_from("<I", sb, o)[0]
        self.bs = 1024 << u32(0x18)
        self.first_data_block = u32(0x14)
        self.inodes_per_group = u32(0x28)
        self.rev = u32(0x4C)
        self.inode_size = struct.unpack_from("<H", sb, 0x58)[0] if self.rev else 128
        self.compat, self.incompat, self.ro_compat = u32(0x5C), u32(0x60), u32(0x64)
        self.is64 = bool(self.incompat & EXT4_INCOMPAT_64BIT)
        self.blocks_count = u32(0x04)
        if self.is64:
            self.blocks_count |= u32(0x150) << 32
        self.desc_size = 32
        if self.is64:
            self.desc_size = struct.unpack_from("<H", sb, 0xFE)[0] or 32
        self.journal_inum = u32(0xE0)
        self.csum = bool(self.ro_compat & EXT4_RO_COMPAT_METADATA_CSUM)
        self.uuid = bytes(sb[0x68:0x78])

    def read_block(self, n):
        self.f.seek(n * self.bs)
        b = self.f.read(self.bs)
        return b + bytes(self.bs - len(b))

    def write_block(self, n, data):
        assert len(data) == self.bs
        self.f.seek(n * self.bs)
        self.f.write(data)

    def close(self):
        self.f.close()

    def inode(self, ino):
        g, i = divmod(ino - 1, self.inodes_per_group)
        gdt = self.first_data_block + 1
        per_block = self.bs // self.desc_size
        blk, off = divmod(g, per_block)
        d = self.read_block(gdt + blk)[off * self.desc_size:(off + 1) * self.desc_size]
        itab = struct.unpack_from("<I", d, 8)[0]
        if self.desc_size >= 64:
            itab |= struct.unpack_from("<I", d, 0x28)[0] << 32
        ib, io = divmod(i * self.inode_size, self.bs)
        return self.read_block(itab + ib)[io:io + self.inode_size]

    def bmap(self, ino):
        """The inode's block map: list of physical blocks, index = logical
        block (0 for a hole)."""
        inode = self.inode(ino)
        size = struct.unpack_from("<I", inode, 4)[0] | (
            struct.unpack_from("<I", inode, 0x6C)[0] << 32)
        nblocks = (size + self.bs - 1) // self.bs
        flags = struct.unpack_from("<I", inode, 0x20)[0]
        iblock = inode[0x28:0x28 + 60]
        m = [0] * nblocks
        if flags & EXT4_EXTENTS_FL:
            self._extents(iblock, m, 0)
        else:
            self._indirect(iblock, m)
        return m

    def _extents(self, node, m, level):
        if level > 8:
            raise CraftError("extent tree too deep")
        magic, entries, _max, depth = struct.unpack_from("<HHHH", node, 0)
        if magic != 0xF30A:
            raise CraftError("bad extent header")
        for k in range(entries):
            e = node[12 + 12 * k:24 + 12 * k]
            if depth == 0:
                lblk, ln, hi, lo = struct.unpack("<IHHI", e)
                if ln > 32768:
                    ln -= 32768      # unwritten
                for j in range(ln):
                    if lblk + j < len(m):
                        m[lblk + j] = (hi << 32 | lo) + j
            else:
                _lblk, lo, hi, _ = struct.unpack("<IIHH", e)
                self._extents(self.read_block(hi << 32 | lo), m, level + 1)

    def _indirect(self, iblock, m):
        ptrs = struct.unpack("<15I", iblock)
        per = self.bs // 4
        for i in range(12):
            if i < len(m):
                m[i] = ptrs[i]
        pos = [12]

        def walk(blk, depth):
            if blk == 0:
                pos[0] += per ** depth
                return
            if depth == 0:
                if pos[0] < len(m):
                    m[pos[0]] = blk
                pos[0] += 1
                return
            for p in struct.unpack("<%dI" % per, self.read_block(blk)):
                if pos[0] >= len(m):
                    return
                walk(p, depth - 1)
        for d, p in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
            if pos[0] >= len(m):
                break
            walk(p, d)

    def set_needs_recovery(self, on=True):
        if on:
            self.incompat |= EXT4_INCOMPAT_RECOVER
        else:
            self.incompat &= ~EXT4_INCOMPAT_RECOVER
        struct.pack_into("<I", self.sb, 0x60, self.incompat)
        if self.csum:
            struct.pack_into("<I", self.sb, 0x3FC, crc32c(0xFFFFFFFF, self.sb[:0x3FC]))
        self.f.seek(1024)
        self.f.write(self.sb)


# ---------------------------------------------------------------------
# Transactions.


class Txn:
    """One transaction: logged blocks [(blocknr, bytes)], revoked block
    numbers, and damage flags (torn, badcommit, badtag, baddesc,
    badrevoke, hugerevoke, loop)."""

    def __init__(self, logs=None, revokes=None, flags=()):
        self.logs = list(logs or [])
        self.revokes = list(revokes or [])
        self.flags = set(flags)


class Journal:
    def __init__(self, img, csum=None, tag64=None):
        self.img = img
        if not img.compat & 0x4 or img.journal_inum == 0:
            raise CraftError("the filesystem has no internal journal")
        self.map = img.bmap(img.journal_inum)
        if not self.map or not self.map[0]:
            raise CraftError("journal inode has no block 0")
        self.jsb = bytearray(img.read_block(self.map[0])[:1024])
        be = lambda o: struct.unpack_from(">I", self.jsb, o)[0]
        if be(0) != JBD2_MAGIC or be(4) not in (SB_V1, SB_V2):
            raise CraftError("no journal superblock in journal block 0")
        self.bs = img.bs
        self.maxlen = be(0x10)
        self.first = be(0x14)
        self.sequence = be(0x18)
        if csum is None:
            csum = "v3" if img.csum else "none"
        self.csum = csum
        self.tag64 = img.is64 if tag64 is None else tag64
        self.uuid = bytes(self.jsb[0x30:0x40])
        self.seed = crc32c(0xFFFFFFFF, self.uuid)

    # Geometry.
    def phys(self, jblk):
        if jblk >= len(self.map) or not self.map[jblk]:
            raise CraftError("journal block %d is not mapped" % jblk)
        return self.map[jblk]

    def next(self, pos):
        pos += 1
        return self.first if pos >= self.maxlen else pos

    def tag_bytes(self):
        if self.csum == "v3":
            return 16
        n = 12 + (2 if self.csum == "v2" else 0)
        return n if self.tag64 else n - 4

    def tail(self):
        return 4 if self.csum in ("v2", "v3") else 0

    # Block builders.
    def _header(self, btype, tid):
        b = bytearray(self.bs)
        struct.pack_into(">III", b, 0, JBD2_MAGIC, btype, tid & 0xFFFFFFFF)
        return b

    def _tail_csum(self, b, bad=False):
        if self.tail():
            b[-4:] = bytes(4)
            c = crc32c(self.seed, b)
            struct.pack_into(">I", b, self.bs - 4, c ^ (0xDEAD if bad else 0))

    def _tag(self, blocknr, flags, csum32):
        if self.csum == "v3":
            return struct.pack(">IIII", blocknr & 0xFFFFFFFF, flags,
                               blocknr >> 32, csum32)
        t = struct.pack(">IHH", blocknr & 0xFFFFFFFF,
                        (csum32 & 0xFFFF) if self.csum == "v2" else 0, flags)
        if self.tag64:
            t += struct.pack(">I", blocknr >> 32)
        if self.csum == "v2":
            t += bytes(2)
        assert len(t) == self.tag_bytes()
        return t

    def descriptors(self, tid, logs, bad_tag=False, bad_desc=False):
        """[(descriptor bytes, [logged bytes...])] for a list of
        (blocknr, data); escapes and tag checksums included."""
        out = []
        room = self.bs - 12 - self.tail()
        tb = self.tag_bytes()
        i = 0
        while i < len(logs):
            d = self._header(DESCRIPTOR, tid)
            off, copies = 12, []
            while i < len(logs):
                need = tb + (16 if not copies else 0)
                if off + need > 12 + room:
                    break
                blocknr, data = logs[i]
                data = bytearray(data)
                flags = 0 if not copies else FLAG_SAME_UUID
                if struct.unpack_from(">I", data, 0)[0] == JBD2_MAGIC:
                    data[0:4] = bytes(4)
                    flags |= FLAG_ESCAPE
                c = 0
                if self.csum in ("v2", "v3"):
                    c = crc32c(crc32c(self.seed, struct.pack(">I", tid & 0xFFFFFFFF)), data)
                if bad_tag and i == 0:
                    data[self.bs // 2] ^= 0x55
                if i == len(logs) - 1 or off + need + tb > 12 + room:
                    flags |= FLAG_LAST_TAG
                t = self._tag(blocknr, flags, c)
                d[off:off + tb] = t
                off += tb
                if not copies:
                    d[off:off + 16] = self.uuid
                    off += 16
                copies.append(bytes(data))
                i += 1
            self._tail_csum(d, bad_desc and not out)
            out.append((bytes(d), copies))
        return out

    def revoke_blocks(self, tid, revokes, bad=False, huge=False):
        rec = 8 if self.tag64 else 4
        per = (self.bs - 16 - self.tail()) // rec
        out = []
        for k in range(0, len(revokes) or 1, per):
            chunk = revokes[k:k + per]
            b = self._header(REVOKE, tid)
            off = 16
            for r in chunk:
                struct.pack_into(">Q" if rec == 8 else ">I", b, off, r)
                off += rec
            struct.pack_into(">I", b, 12, 0xFFFFFFF0 if huge else off)
            self._tail_csum(b, bad and not out)
            out.append(bytes(b))
        return out

    def commit_block(self, tid, when, v1sum=None, bad=False):
        b = self._header(COMMIT, tid)
        if self.csum == "v1":
            b[12], b[13] = 1, 4          # JBD2_CRC32_CHKSUM, size 4
            struct.pack_into(">I", b, 16, (v1sum ^ (0xBAD if bad else 0)) & 0xFFFFFFFF)
        struct.pack_into(">QI", b, 0x30, when, 0)
        if self.csum in ("v2", "v3"):
            c = crc32c(self.seed, b)
            struct.pack_into(">I", b, 16, c ^ (0xBAD if bad else 0))
        return bytes(b)

    # Superblock.
    def write_jsb(self, start, sequence, revoke, hostile=()):
        j = self.jsb
        struct.pack_into(">I", j, 4, SB_V2)
        struct.pack_into(">II", j, 0x18, sequence & 0xFFFFFFFF, start)
        compat = struct.unpack_from(">I", j, 0x24)[0] & ~COMPAT_CHECKSUM
        inc = struct.unpack_from(">I", j, 0x28)[0]
        inc &= ~(INCOMPAT_64BIT | INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3)
        if revoke:
            inc |= INCOMPAT_REVOKE
        if self.tag64:
            inc |= INCOMPAT_64BIT
        if self.csum == "v1":
            compat |= COMPAT_CHECKSUM
        elif self.csum == "v2":
            inc |= INCOMPAT_CSUM_V2
        elif self.csum == "v3":
            inc |= INCOMPAT_CSUM_V3
        j[0x50] = 4 if self.csum in ("v2", "v3") else 0
        h = set(hostile)
        if "v2v3" in h:
            inc |= INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3
        if "v1v3" in h:
            inc |= INCOMPAT_CSUM_V3
            compat |= COMPAT_CHECKSUM
            j[0x50] = 4
        if "incompat" in h:
            inc |= 0x100
        struct.pack_into(">III", j, 0x24, compat, inc,
                         struct.unpack_from(">I", j, 0x2C)[0])
        if "blocksize" in h:
            struct.pack_into(">I", j, 0x0C, self.bs * 2)
        if "maxlen" in h:
            struct.pack_into(">I", j, 0x10, len(self.map) + 100)
        if "first0" in h:
            struct.pack_into(">I", j, 0x14, 0)
        if "firstpast" in h:
            struct.pack_into(">I", j, 0x14, self.maxlen + 5)
        if "startpast" in h:
            struct.pack_into(">I", j, 0x1C, self.maxlen + 5)
        if "blocktype" in h:
            struct.pack_into(">I", j, 4, DESCRIPTOR)
        if "csumtype" in h:
            j[0x50] = 1
        if "nrusers" in h:
            struct.pack_into(">I", j, 0x40, 5)
        j[0xFC:0x100] = bytes(4)
        if inc & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3):
            c = crc32c(0xFFFFFFFF, j)
            struct.pack_into(">I", j, 0xFC, c ^ (1 if "csum" in h else 0))
        blk = bytearray(self.img.read_block(self.phys(0)))
        blk[:1024] = j
        self.img.write_block(self.phys(0), bytes(blk))

    # The whole log.
    def write(self, txns, start=None, sequence=None, when=1700000000,
              hostile=(), recovery_flag=True, terminate=True):
        """Write txns from journal block start (default s_first) with
        first tid sequence (default the journal's s_sequence).  Returns
        a list of (journal block, kind, tid) describing the layout."""
        if start is None:
            start = self.first
        if sequence is None:
            sequence = self.sequence
        if not self.first <= start < self.maxlen:
            raise CraftError("start %d outside the log [%d, %d)"
                             % (start, self.first, self.maxlen))
        pos, tid, layout = start, sequence, []
        used = 0

        def put(data, kind):
            nonlocal pos, used
            used += 1
            if used > self.maxlen - self.first:
                raise CraftError("the transactions do not fit in the log")
            self.img.write_block(self.phys(pos), data)
            layout.append((pos, kind, tid & 0xFFFFFFFF))
            pos = self.next(pos)

        any_revoke = False
        for t in txns:
            v1 = 0xFFFFFFFF
            if "loop" in t.flags:
                if len(txns) != 1:
                    raise CraftError("loop must be the only transaction")
                self._write_loop(tid, pos, layout)
                return layout
            for d, copies in self.descriptors(tid, t.logs, "badtag" in t.flags,
                                              "baddesc" in t.flags):
                put(d, "descriptor")
                v1 = crc32_be(v1, d)
                for c in copies:
                    put(c, "data")
                    v1 = crc32_be(v1, c)
            if t.revokes or "hugerevoke" in t.flags:
                any_revoke = True
                for r in self.revoke_blocks(tid, t.revokes, "badrevoke" in t.flags,
                                            "hugerevoke" in t.flags):
                    put(r, "revoke")
            if "torn" not in t.flags:
                put(self.commit_block(tid, when, v1, "badcommit" in t.flags), "commit")
            tid += 1
            when += 1
        if terminate and used < self.maxlen - self.first:
            # The block after the log must not continue it.
            self.img.write_block(self.phys(pos), bytes(self.bs))
        self.write_jsb(start, sequence, any_revoke, hostile)
        if recovery_flag:
            self.img.set_needs_recovery(True)
        return layout

    def _write_loop(self, tid, start, layout):
        """Descriptors whose tags cover the whole log: after the last one
        the scan is back at the first descriptor, same tid, no commit."""
        tb = self.tag_bytes()
        cap = (self.bs - 12 - self.tail() - 16) // tb
        total = self.maxlen - self.first
        pos, left = start, total
        target = self.img.first_data_block + 1   # any block: never written
        while left > 0:
            n = min(cap, left - 1)
            if left - 1 - n == 1:    # leave no lone block: a descriptor
                n -= 1               # needs at least one tag after it
            ds = self.descriptors(tid, [(target, bytes(self.bs))] * n)
            assert len(ds) == 1
            d = ds[0][0]
            self.img.write_block(self.phys(pos), d)
            layout.append((pos, "descriptor", tid))
            for _ in range(n + 1):
                pos = self.next(pos)
            left -= n + 1
        assert pos == start
        self.write_jsb(start, tid, False)
        self.img.set_needs_recovery(True)


# ---------------------------------------------------------------------
# Command line.


def _blocknr(s, journal):
    s = s.strip()
    if s.startswith("j:"):
        return journal.phys(int(s[2:], 0))
    return int(s, 0)


def parse_txn(arg, img, journal, shadow):
    """shadow: dict block -> bytes, the image as of the previous diff:
    items (updated here)."""
    t = Txn()
    jblocks = set(b for b in journal.map if b)
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if item in ("torn", "badcommit", "badtag", "baddesc", "badrevoke",
                    "hugerevoke", "loop"):
            t.flags.add(item)
        elif item.startswith("revoke:"):
            r = item[7:]
            if "-" in r:
                a, b = r.split("-", 1)
                t.revokes += range(_blocknr(a, journal), _blocknr(b, journal) + 1)
            else:
                t.revokes.append(_blocknr(r, journal))
        elif item.startswith("diff:"):
            other = Image(item[5:])
            if other.bs != img.bs:
                raise CraftError("%s: another block size" % item[5:])
            n = max(img.blocks_count, other.blocks_count)
            for b in range(n):
                if b in jblocks:
                    continue
                new = other.read_block(b)
                old = shadow.get(b)
                if old is None:
                    old = img.read_block(b)
                if new != old:
                    t.logs.append((b, new))
                    shadow[b] = new
            other.close()
        elif "=" in item:
            blk, src = item.split("=", 1)
            b = _blocknr(blk, journal)
            if src == "zero":
                data = bytes(img.bs)
            elif src.startswith("fill:"):
                data = bytes([int(src[5:], 0)]) * img.bs
            elif src.startswith("img:"):
                o = Image(src[4:])
                data = o.read_block(b)
                o.close()
            else:
                path, off = src, 0
                if "@" in src:
                    path, o = src.rsplit("@", 1)
                    off = int(o, 0)
                with open(path, "rb") as f:
                    f.seek(off)
                    data = f.read(img.bs)
                data += bytes(img.bs - len(data))
            t.logs.append((b, data))
        else:
            raise CraftError("unknown transaction item: %r" % item)
    return t


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Write jbd2 transactions into an ext2/3/4 image's internal journal.",
        epilog="TXN: comma-separated items: BLK=FILE[@OFF], BLK=img:IMG2, diff:IMG2, "
        "BLK=zero, BLK=fill:N, revoke:BLK[-BLK2], torn, badcommit, badtag, baddesc, "
        "badrevoke, hugerevoke, loop.  BLK: a number or j:N (journal block N).")
    p.add_argument("image")
    p.add_argument("txns", nargs="*", metavar="TXN")
    p.add_argument("--csum", choices=("none", "v1", "v2", "v3"),
                   help="journal checksums (default: v3 on metadata_csum, else none)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tag64", dest="tag64", action="store_true", default=None,
                   help="64-bit block numbers (journal 64BIT feature)")
    g.add_argument("--tag32", dest="tag64", action="store_false",
                   help="32-bit block numbers")
    p.add_argument("--start", type=lambda s: int(s, 0),
                   help="journal block of the first transaction (default s_first)")
    p.add_argument("--from-end", type=int, metavar="N",
                   help="start N blocks before the end of the log (a log that wraps)")
    p.add_argument("--sequence", type=lambda s: int(s, 0),
                   help="tid of the first transaction (default: the journal's s_sequence)")
    p.add_argument("--time", type=int, default=1700000000,
                   help="commit time of the first transaction (later ones +1 s)")
    p.add_argument("--hostile", action="append", default=[],
                   choices=("csum", "blocksize", "maxlen", "first0", "firstpast",
                            "startpast", "v2v3", "v1v3", "incompat", "blocktype",
                            "csumtype", "nrusers"),
                   help="damage the journal superblock (repeatable)")
    p.add_argument("--no-recovery-flag", action="store_true",
                   help="do not set needs_recovery in the ext4 superblock")
    p.add_argument("--diff-to-file", nargs=2, metavar=("IMG2", "FILE"),
                   help="write nothing: print the comma-separated list of the blocks "
                   "(outside the journal) that differ between IMAGE and IMG2 and "
                   "write IMG2's copies of them, in that order, to FILE (input for "
                   "debugfs's jw -b LIST FILE)")
    p.add_argument("--info", action="store_true",
                   help="print the journal's geometry as JSON and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="print the layout")
    a = p.parse_intermixed_args(argv)
    try:
        img = Image(a.image)
        j = Journal(img, a.csum, a.tag64)
        if a.info:
            print(json.dumps({
                "blocksize": img.bs, "blocks_count": img.blocks_count,
                "maxlen": j.maxlen, "first": j.first, "sequence": j.sequence,
                "start": struct.unpack_from(">I", j.jsb, 0x1C)[0],
                "incompat": struct.unpack_from(">I", j.jsb, 0x28)[0],
                "journal_blocks": len(j.map), "journal_sb_block": j.phys(0),
                "journal_last_block": j.phys(j.maxlen - 1),
                "csum": j.csum, "tag64": j.tag64}))
            return 0
        if a.diff_to_file:
            t = parse_txn("diff:" + a.diff_to_file[0], img, j, {})
            with open(a.diff_to_file[1], "wb") as f:
                for _, data in t.logs:
                    f.write(data)
            print(",".join(str(b) for b, _ in t.logs))
            return 0
        start = a.start
        if a.from_end is not None:
            start = j.maxlen - a.from_end
        shadow = {}
        txns = [parse_txn(t, img, j, shadow) for t in a.txns]
        layout = j.write(txns, start=start, sequence=a.sequence, when=a.time,
                         hostile=a.hostile, recovery_flag=not a.no_recovery_flag)
        if a.verbose:
            for pos, kind, tid in layout:
                print("%6d %-10s tid %u" % (pos, kind, tid))
        img.close()
    except (CraftError, OSError, ValueError) as e:
        print("jbd2craft: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
