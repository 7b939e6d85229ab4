/* ext4fs filter test: many requests in flight on one connection.
 *
 * Usage: test-parallel-aio SOCKET ORIGINAL OUTPUT
 *
 * Connects to an nbdkit serving a file with the ext4fs filter over a
 * Unix socket.  ORIGINAL holds the file's content before the test.
 * Keeps 64 nbd_aio_pread/nbd_aio_pwrite requests in flight at random,
 * unaligned offsets (an in-flight write never overlaps another
 * in-flight request), checks every read against a shadow copy in
 * memory, then reads everything back and writes the shadow copy to
 * OUTPUT for the caller to compare with the image.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <inttypes.h>

#include <libnbd.h>

#define IN_FLIGHT 64
#define TOTAL_OPS 6000
#define MAX_LEN (128 * 1024)

struct op {
  bool busy;
  bool is_write;
  uint64_t offset;
  size_t len;
  char *buf;
};

static struct op ops[IN_FLIGHT];
static unsigned char *shadow;
static uint64_t size;
static int failed;
static unsigned completed_reads, completed_writes;

static uint64_t rng_state = 88172645463325252ULL;

static uint64_t
rnd (void)
{
  /* xorshift64 */
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

static int
completed (void *user_data, int *error)
{
  struct op *op = user_data;

  if (*error) {
    fprintf (stderr, "%s at %" PRIu64 "+%zu failed: %s\n",
             op->is_write ? "pwrite" : "pread", op->offset, op->len,
             strerror (*error));
    failed = 1;
  }
  else if (!op->is_write) {
    /* No write overlapping this range was in flight since it was
     * issued, so the shadow range is what must be read.
     */
    if (memcmp (op->buf, shadow + op->offset, op->len) != 0) {
      size_t i;
      for (i = 0; i < op->len; ++i)
        if ((unsigned char) op->buf[i] != shadow[op->offset + i])
          break;
      fprintf (stderr, "pread at %" PRIu64 "+%zu: byte %" PRIu64
               " is 0x%02x, expected 0x%02x\n",
               op->offset, op->len, op->offset + i,
               (unsigned char) op->buf[i], shadow[op->offset + i]);
      failed = 1;
    }
    completed_reads++;
  }
  else
    completed_writes++;
  op->busy = false;
  return 1;                     /* retire the command */
}

/* Does [off, off+len) overlap an in-flight request (any, or only
 * writes)?
 */
static bool
overlaps (uint64_t off, size_t len, bool writes_only)
{
  int i;

  for (i = 0; i < IN_FLIGHT; ++i) {
    if (!ops[i].busy || (writes_only && !ops[i].is_write))
      continue;
    if (off < ops[i].offset + ops[i].len && ops[i].offset < off + len)
      return true;
  }
  return false;
}

int
main (int argc, char *argv[])
{
  struct nbd_handle *nbd;
  FILE *fp;
  int64_t s;
  unsigned issued = 0;
  int i, max_in_flight = 0;
  uint64_t off;
  char *buf;

  if (argc != 4) {
    fprintf (stderr, "usage: %s SOCKET ORIGINAL OUTPUT\n", argv[0]);
    exit (EXIT_FAILURE);
  }
  if (getenv ("SEED"))
    rng_state ^= strtoull (getenv ("SEED"), NULL, 0) * 0x9E3779B97F4A7C15ULL;

  nbd = nbd_create ();
  if (nbd == NULL || nbd_connect_unix (nbd, argv[1]) == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    exit (EXIT_FAILURE);
  }
  s = nbd_get_size (nbd);
  if (s == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    exit (EXIT_FAILURE);
  }
  size = s;

  shadow = malloc (size);
  fp = fopen (argv[2], "r");
  if (shadow == NULL || fp == NULL || fread (shadow, 1, size, fp) != size) {
    perror (argv[2]);
    exit (EXIT_FAILURE);
  }
  fclose (fp);

  for (i = 0; i < IN_FLIGHT; ++i) {
    ops[i].buf = malloc (MAX_LEN);
    if (ops[i].buf == NULL) { perror ("malloc"); exit (EXIT_FAILURE); }
  }

  while (!failed && (issued < TOTAL_OPS || nbd_aio_in_flight (nbd) > 0)) {
    int n_busy = 0;

    for (i = 0; i < IN_FLIGHT && issued < TOTAL_OPS; ++i) {
      struct op *op = &ops[i];
      int tries;
      int64_t r;
      uint32_t flags = 0;

      if (op->busy)
        continue;
      op->is_write = rnd () % 2;
      /* Find a range that does not conflict with what is in flight. */
      for (tries = 0; tries < 100; ++tries) {
        op->len = 1 + rnd () % (rnd () % 4 == 0 ? MAX_LEN : 4096 * 3);
        if (op->len > size) op->len = size;
        op->offset = rnd () % (size - op->len + 1);
        if (!overlaps (op->offset, op->len, !op->is_write))
          break;
      }
      if (tries == 100)
        continue;
      if (op->is_write) {
        size_t j;
        for (j = 0; j < op->len; ++j)
          op->buf[j] = rnd () & 0xff;
        memcpy (shadow + op->offset, op->buf, op->len);
        if (rnd () % 8 == 0)
          flags = LIBNBD_CMD_FLAG_FUA;
        r = nbd_aio_pwrite (nbd, op->buf, op->len, op->offset,
                            (nbd_completion_callback) {
                              .callback = completed, .user_data = op },
                            flags);
      }
      else
        r = nbd_aio_pread (nbd, op->buf, op->len, op->offset,
                           (nbd_completion_callback) {
                             .callback = completed, .user_data = op },
                           0);
      if (r == -1) {
        fprintf (stderr, "%s\n", nbd_get_error ());
        exit (EXIT_FAILURE);
      }
      op->busy = true;
      issued++;
    }

    for (i = 0; i < IN_FLIGHT; ++i)
      n_busy += ops[i].busy;
    if (n_busy > max_in_flight)
      max_in_flight = n_busy;

    if (nbd_poll (nbd, -1) == -1) {
      fprintf (stderr, "%s\n", nbd_get_error ());
      exit (EXIT_FAILURE);
    }
  }
  if (failed)
    exit (EXIT_FAILURE);
  printf ("%u reads, %u writes, up to %d requests in flight\n",
          completed_reads, completed_writes, max_in_flight);
  if (max_in_flight < IN_FLIGHT / 2) {
    fprintf (stderr, "only %d requests were ever in flight\n", max_in_flight);
    exit (EXIT_FAILURE);
  }

  if (nbd_flush (nbd, 0) == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    exit (EXIT_FAILURE);
  }

  /* Read everything back. */
  buf = malloc (1024 * 1024);
  if (buf == NULL) { perror ("malloc"); exit (EXIT_FAILURE); }
  for (off = 0; off < size; off += 1024 * 1024) {
    size_t n = size - off < 1024 * 1024 ? size - off : 1024 * 1024;
    if (nbd_pread (nbd, buf, n, off, 0) == -1) {
      fprintf (stderr, "%s\n", nbd_get_error ());
      exit (EXIT_FAILURE);
    }
    if (memcmp (buf, shadow + off, n) != 0) {
      size_t j;
      for (j = 0; j < n && (unsigned char) buf[j] == shadow[off + j]; ++j)
        ;
      fprintf (stderr, "final read: byte %" PRIu64 " is 0x%02x, "
               "expected 0x%02x\n", off + j, (unsigned char) buf[j],
               shadow[off + j]);
      exit (EXIT_FAILURE);
    }
  }

  if (nbd_shutdown (nbd, 0) == -1) {
    fprintf (stderr, "%s\n", nbd_get_error ());
    exit (EXIT_FAILURE);
  }
  nbd_close (nbd);

  fp = fopen (argv[3], "w");
  if (fp == NULL || fwrite (shadow, 1, size, fp) != size || fclose (fp) != 0) {
    perror (argv[3]);
    exit (EXIT_FAILURE);
  }
  exit (EXIT_SUCCESS);
}
