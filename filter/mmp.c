/* ext4fs: multi-mount protection (MMP) through our own channel.
 *
 * Owns: the MMP claim of a filesystem opened read-write, its updater
 * thread, and its release.  libext2fs's own MMP code reopens the
 * device by name (O_DIRECT), which cannot work through an nbdkit
 * context, so the filesystem is opened with EXT2_FLAG_SKIP_MMP and the
 * protocol is done here, with uncached I/O straight to the shared
 * context followed by a flush:
 *
 *   claim:   read the MMP block.  CLEAN: go on.  FSCK: e2fsck or a
 *            libext2fs tool holds it: refuse.  Any other sequence:
 *            somebody may be using it: wait 2 x interval + 1 s and
 *            read again; if the sequence moved, refuse.  Then write a
 *            new random sequence with our node name, wait 2 x interval
 *            + 1 s again, and if the block still holds our sequence,
 *            the filesystem is ours.
 *   hold:    a thread writes a new sequence every interval seconds,
 *            as the kernel's kmmpd does, so that anyone else trying
 *            to claim it sees it move and backs off.  If the block
 *            ever holds a sequence we did not write, another node has
 *            taken the filesystem: we stop writing to it at all.
 *   release: stop the thread, then (after the last metadata write)
 *            write EXT4_MMP_SEQ_CLEAN.
 *
 * Read-only opens never touch the MMP block.
 *
 * Locks: mmp->lock protects stop/seq/lost and the condition variable;
 * it is never held during I/O.  No libext2fs call is made here after
 * mmp_start (the checksum seed is copied), so the block can be
 * released after the filesystem is closed.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "mmp.h"

struct ext4fs_mmp {
  struct ext4fs_fs *fsi;
  uint64_t blk;                 /* MMP block number */
  bool csum;                    /* metadata_csum: checksum the block */
  uint32_t csum_seed;           /* fs->csum_seed, copied at start */
  unsigned interval;            /* seconds between updates */
  pthread_t thread;
  bool thread_started;

  pthread_mutex_t lock;         /* Protects: below */
  pthread_cond_t cond;
  bool stop;
  uint32_t seq;                 /* the last sequence we wrote */
  bool lost;                    /* another node wrote the block */
};

static int
mmp_read (struct ext4fs_fs *fsi, uint64_t blk, struct mmp_struct *m, int *err)
{
  CLEANUP_FREE char *buf = malloc (fsi->blocksize);

  if (buf == NULL) {
    *err = errno;
    return -1;
  }
  if (ext4fs_dev_pread (fsi->dev, buf, fsi->blocksize, blk << fsi->blockbits,
                        err) == -1)
    return -1;
  memcpy (m, buf, sizeof *m);
  return 0;
}

/* Our own checksum helper: the filesystem may already be closed when
 * the block is released.
 */
static uint32_t
mmp_csum (const struct ext4fs_mmp *mmp, const struct mmp_struct *m)
{
  return ext2fs_crc32c_le (mmp->csum_seed, (const unsigned char *) m,
                           offsetof (struct mmp_struct, mmp_checksum));
}

static int
mmp_write (const struct ext4fs_mmp *mmp, struct mmp_struct *m, int *err)
{
  struct ext4fs_fs *fsi = mmp->fsi;
  uint64_t blk = mmp->blk;
  CLEANUP_FREE char *buf = calloc (1, fsi->blocksize);

  if (buf == NULL) {
    *err = errno;
    return -1;
  }
  m->mmp_time = time (NULL);
  m->mmp_checksum = mmp->csum ? mmp_csum (mmp, m) : 0;
  memcpy (buf, m, sizeof *m);
  /* Like O_DIRECT|O_SYNC in the kernel and e2fsprogs: on stable
   * storage before we rely on it.  FUA (a plugin flush only if the
   * plugin has no FUA), so that an update does not wait for a flush
   * of everything else written since the last one.
   */
  if (ext4fs_dev_pwrite (fsi->dev, buf, fsi->blocksize, blk << fsi->blockbits,
                         NBDKIT_FLAG_FUA, err) == -1)
    return -1;
  return 0;
}

static int
mmp_valid (const struct ext4fs_mmp *mmp, const struct mmp_struct *m)
{
  return m->mmp_magic == EXT4_MMP_MAGIC &&
    (!mmp->csum || m->mmp_checksum == mmp_csum (mmp, m));
}

static uint32_t
new_seq (void)
{
  struct timespec ts;
  uint64_t x;

  clock_gettime (CLOCK_REALTIME, &ts);
  x = ((uint64_t) ts.tv_nsec << 20) ^ ts.tv_sec ^ ((uint64_t) getpid () << 40);
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  return (uint32_t) (x % EXT4_MMP_SEQ_MAX) + 1;
}

static void
describe (const struct mmp_struct *m, char *out, size_t len)
{
  snprintf (out, len, "node '%.*s', device '%.*s'",
            (int) strnlen ((const char *) m->mmp_nodename,
                           sizeof m->mmp_nodename),
            (const char *) m->mmp_nodename,
            (int) strnlen ((const char *) m->mmp_bdevname,
                           sizeof m->mmp_bdevname),
            (const char *) m->mmp_bdevname);
}

static void *
updater (void *arg)
{
  struct ext4fs_mmp *mmp = arg;
  struct ext4fs_fs *fsi = mmp->fsi;

  pthread_mutex_lock (&mmp->lock);
  while (!mmp->stop) {
    struct timespec deadline;
    struct mmp_struct m;
    uint32_t ours;
    int err, r;

    /* Monotonic: a step of the wall clock neither delays nor hurries
     * the next update.
     */
    clock_gettime (CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += mmp->interval;
    pthread_cond_timedwait (&mmp->cond, &mmp->lock, &deadline);
    if (mmp->stop)
      break;
    ours = mmp->seq;
    pthread_mutex_unlock (&mmp->lock);

    r = mmp_read (fsi, mmp->blk, &m, &err);
    if (r == 0 && (m.mmp_magic != EXT4_MMP_MAGIC || m.mmp_seq != ours)) {
      char who[128];
      describe (&m, who, sizeof who);
      nbdkit_error ("MMP: the filesystem's MMP block was changed by someone "
                    "else (%s): another host or program is using the "
                    "filesystem; ext4fs stops writing to it", who);
      pthread_mutex_lock (&mmp->lock);
      __atomic_store_n (&mmp->lost, true, __ATOMIC_RELEASE);
      break;
    }
    if (r == 0) {
      m.mmp_seq = ours >= EXT4_MMP_SEQ_MAX ? 1 : ours + 1;
      r = mmp_write (mmp, &m, &err);
      pthread_mutex_lock (&mmp->lock);
      if (r == 0)
        mmp->seq = m.mmp_seq;
    }
    else
      pthread_mutex_lock (&mmp->lock);
    if (r == -1)
      nbdkit_debug ("MMP: updating the MMP block failed: %s", strerror (err));
  }
  pthread_mutex_unlock (&mmp->lock);
  return NULL;
}

static unsigned
wait_time (unsigned interval)
{
  unsigned a = 2 * interval + 1, b = interval + 60;
  return a < b ? a : b;
}

struct ext4fs_mmp *
mmp_start (struct ext4fs_fs *fsi)
{
  ext2_filsys fs = fsi->fs;
  struct ext4fs_mmp *mmp;
  struct mmp_struct m;
  uint32_t seq;
  unsigned interval;
  char who[128];
  int err;

  mmp = calloc (1, sizeof *mmp);
  if (mmp == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  pthread_mutex_init (&mmp->lock, NULL);
  {
    pthread_condattr_t ca;
    pthread_condattr_init (&ca);
    pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
    pthread_cond_init (&mmp->cond, &ca);
    pthread_condattr_destroy (&ca);
  }
  mmp->fsi = fsi;
  mmp->blk = fs->super->s_mmp_block;
  mmp->csum = ext2fs_has_feature_metadata_csum (fs->super);
  mmp->csum_seed = fs->csum_seed;
  if (mmp->blk < fsi->first_data_block || mmp->blk >= fsi->blocks_count) {
    nbdkit_error ("MMP: the superblock's MMP block %" PRIu64 " is outside "
                  "the filesystem: run e2fsck", mmp->blk);
    goto fail;
  }
  interval = fs->super->s_mmp_update_interval;
  if (interval < EXT4_MMP_MIN_CHECK_INTERVAL)
    interval = EXT4_MMP_MIN_CHECK_INTERVAL;
  if (interval > EXT4_MMP_MAX_UPDATE_INTERVAL)
    interval = EXT4_MMP_MAX_UPDATE_INTERVAL;

  if (mmp_read (fsi, mmp->blk, &m, &err) == -1)
    goto io_fail;
  if (!mmp_valid (mmp, &m)) {
    nbdkit_error ("MMP: the MMP block %" PRIu64 " is corrupt (bad magic or "
                  "checksum): run e2fsck", mmp->blk);
    goto fail;
  }
  if (m.mmp_check_interval > interval &&
      m.mmp_check_interval <= EXT4_MMP_MAX_UPDATE_INTERVAL)
    interval = m.mmp_check_interval;
  mmp->interval = interval;
  seq = m.mmp_seq;
  describe (&m, who, sizeof who);

  if (seq == EXT4_MMP_SEQ_FSCK) {
    nbdkit_error ("MMP: e2fsck or another libext2fs tool is using the "
                  "filesystem (%s); if none is, clear it with "
                  "'tune2fs -f -E clear_mmp' or run e2fsck", who);
    goto fail;
  }
  if (seq > EXT4_MMP_SEQ_FSCK && seq != EXT4_MMP_SEQ_CLEAN) {
    nbdkit_error ("MMP: unknown sequence 0x%" PRIx32 " in the MMP block: "
                  "run e2fsck", seq);
    goto fail;
  }
  if (seq != EXT4_MMP_SEQ_CLEAN) {
    /* Someone may hold it, or it was not released (a crash).  Watch. */
    nbdkit_debug ("MMP: block not clean (%s), waiting %u s to see if it "
                  "is in use", who, wait_time (interval));
    sleep (wait_time (interval));
    if (mmp_read (fsi, mmp->blk, &m, &err) == -1)
      goto io_fail;
    if (m.mmp_seq != seq) {
      describe (&m, who, sizeof who);
      nbdkit_error ("MMP: the filesystem is in use by another host or "
                    "program (%s): refusing to open it read-write "
                    "(use nbdkit -r to serve it read-only)", who);
      goto fail;
    }
  }

  /* Claim. */
  memset (m.mmp_nodename, 0, sizeof m.mmp_nodename);
  gethostname ((char *) m.mmp_nodename, sizeof m.mmp_nodename);
  memset (m.mmp_bdevname, 0, sizeof m.mmp_bdevname);
  strncpy ((char *) m.mmp_bdevname, "nbdkit-ext4fs", sizeof m.mmp_bdevname);
  m.mmp_check_interval = interval;
  m.mmp_seq = seq = new_seq ();
  if (mmp_write (mmp, &m, &err) == -1)
    goto io_fail;
  nbdkit_debug ("MMP: claimed with sequence %" PRIu32 ", waiting %u s",
                seq, wait_time (interval));
  sleep (wait_time (interval));
  if (mmp_read (fsi, mmp->blk, &m, &err) == -1)
    goto io_fail;
  if (m.mmp_seq != seq) {
    describe (&m, who, sizeof who);
    nbdkit_error ("MMP: another host or program claimed the filesystem at "
                  "the same time (%s): refusing to open it read-write", who);
    goto fail;
  }
  mmp->seq = seq;

  if (pthread_create (&mmp->thread, NULL, updater, mmp) != 0) {
    nbdkit_error ("MMP: pthread_create: %m");
    goto fail;
  }
  mmp->thread_started = true;
  return mmp;

 io_fail:
  nbdkit_error ("MMP: I/O error on the MMP block: %s", strerror (err));
 fail:
  pthread_mutex_destroy (&mmp->lock);
  pthread_cond_destroy (&mmp->cond);
  free (mmp);
  return NULL;
}

bool
mmp_lost (struct ext4fs_mmp *mmp)
{
  /* Called on every write: an atomic read, no lock. */
  return mmp != NULL && __atomic_load_n (&mmp->lost, __ATOMIC_ACQUIRE);
}

void
mmp_stop_thread (struct ext4fs_mmp *mmp)
{
  if (mmp == NULL || !mmp->thread_started)
    return;
  pthread_mutex_lock (&mmp->lock);
  mmp->stop = true;
  pthread_cond_signal (&mmp->cond);
  pthread_mutex_unlock (&mmp->lock);
  pthread_join (mmp->thread, NULL);
  mmp->thread_started = false;
}

void
mmp_release (struct ext4fs_mmp *mmp)
{
  struct mmp_struct m;
  int err;

  if (mmp == NULL)
    return;
  mmp_stop_thread (mmp);
  if (!mmp->lost &&
      mmp_read (mmp->fsi, mmp->blk, &m, &err) == 0 &&
      m.mmp_seq == mmp->seq) {
    m.mmp_seq = EXT4_MMP_SEQ_CLEAN;
    if (mmp_write (mmp, &m, &err) == -1)
      nbdkit_error ("MMP: releasing the MMP block: %s", strerror (err));
  }
  pthread_mutex_destroy (&mmp->lock);
  pthread_cond_destroy (&mmp->cond);
  free (mmp);
}
