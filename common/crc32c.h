/* ext4fs: CRC32C as ext2fs_crc32c_le computes it (the Castagnoli
 * polynomial, reflected, no inversions: the seed in, the register
 * out), with the SSE4.2 instruction where the CPU has it: about eight
 * times faster than libext2fs's tables.  Extent tree changes checksum
 * whole blocks (a read verifies each node of the path, a write sets the
 * block's: that was an eighth of the CPU of allocating writes), and so
 * do a commit's tags and a replay's scan, one crc32c per logged block
 * (a commit's step 1, which holds new handles off, spent most of its
 * CPU in libext2fs's tables).  The instruction is used only after it
 * gave libext2fs's answer once (in each file that includes this).
 *
 * Header only: static functions, no state but the answer of that
 * check.  Thread-safe (the check may run twice; both agree).
 */
#ifndef EXT4FS_CRC32C_H
#define EXT4FS_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <ext2fs/ext2fs.h>

#if defined (__x86_64__) && defined (__GNUC__)
#include <nmmintrin.h>
#define EXT4FS_HAVE_CRC32C_INSN 1
#endif

#ifdef EXT4FS_HAVE_CRC32C_INSN
__attribute__ ((target ("sse4.2"), unused))
static uint32_t
ext4fs_crc32c_insn (uint32_t c, const void *buf, size_t n)
{
  const unsigned char *p = buf;
  uint64_t c64 = c;

  for (; n >= 8; p += 8, n -= 8) {
    uint64_t v;
    memcpy (&v, p, 8);
    c64 = _mm_crc32_u64 (c64, v);
  }
  c = (uint32_t) c64;
  for (; n > 0; ++p, --n)
    c = _mm_crc32_u8 (c, *p);
  return c;
}
#endif

__attribute__ ((unused))
static uint32_t
ext4fs_crc32c (uint32_t c, const void *buf, size_t n)
{
#ifdef EXT4FS_HAVE_CRC32C_INSN
  static int use_insn;          /* 0: not known yet, 1: yes, -1: no */
  int u = __atomic_load_n (&use_insn, __ATOMIC_RELAXED);

  if (u == 0) {
    unsigned char t[1031];
    size_t i;

    for (i = 0; i < sizeof t; ++i)
      t[i] = (unsigned char) (i * 131 + 7);
    __builtin_cpu_init ();
    u = __builtin_cpu_supports ("sse4.2") &&
      ext4fs_crc32c_insn (0x12345678, t, sizeof t) ==
      ext2fs_crc32c_le (0x12345678, t, sizeof t) ? 1 : -1;
    __atomic_store_n (&use_insn, u, __ATOMIC_RELAXED);
  }
  if (u == 1)
    return ext4fs_crc32c_insn (c, buf, n);
#endif
  return ext2fs_crc32c_le (c, buf, n);
}

#endif /* EXT4FS_CRC32C_H */
