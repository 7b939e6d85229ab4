/* A test-only LD_PRELOAD shim: step the wall clock of one process
 * while it runs, with the kernel's semantics for absolute waits
 * (test-mmp-clock.sh).
 *
 * CLOCKSTEP_FILE=PATH: while PATH exists it holds an integer number of
 * seconds (may be negative) added to CLOCK_REALTIME and
 * CLOCK_REALTIME_COARSE (clock_gettime), to time () and to
 * gettimeofday ().  The file is read again at every call, so the test
 * steps the clock by rewriting it (atomically: write another file and
 * rename it over PATH).  Without CLOCKSTEP_FILE the shim passes every
 * call straight through.
 *
 * A step must also move the deadlines of waits on the realtime clock,
 * as a real step does: a pthread_cond_timedwait on a condvar using
 * CLOCK_REALTIME (the default) for an absolute time an hour after a
 * backward step of an hour waits an hour more.  libfaketime turns the
 * deadline into a timeout when the wait starts, so a step during the
 * wait changes nothing; here the wait is cut into slices of at most
 * SLICE_NS of real time, and after each one the faked clock is read
 * again and compared with the deadline.  pthread_cond_init and
 * pthread_cond_destroy are interposed to know which condvars were
 * created with CLOCK_MONOTONIC (pthread_condattr_setclock): those are
 * waited on unchanged, as a realtime step does not move that clock.
 * Any other condvar, including one set with PTHREAD_COND_INITIALIZER,
 * uses CLOCK_REALTIME.  pthread_cond_clockwait with CLOCK_REALTIME is
 * emulated the same way.
 *
 * Locks: one mutex around the table of monotonic condvars (tests only:
 * the cost does not matter).
 */

#include <config.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define SLICE_NS 100000000      /* 100 ms: the longest real wait at once */
#define MAX_MONO 1024           /* monotonic condvars alive at once */

typedef int (*clock_gettime_fn) (clockid_t, struct timespec *);
typedef int (*cond_init_fn) (pthread_cond_t *, const pthread_condattr_t *);
typedef int (*cond_destroy_fn) (pthread_cond_t *);
typedef int (*cond_timedwait_fn) (pthread_cond_t *, pthread_mutex_t *,
                                  const struct timespec *);
typedef int (*cond_clockwait_fn) (pthread_cond_t *, pthread_mutex_t *,
                                  clockid_t, const struct timespec *);

/* The next definition of NAME (glibc's), in VERSION if it has one:
 * pthread_cond_* have an old GLIBC_2.2.5 version for the condvars of
 * LinuxThreads, which plain dlsym might return.  Aborts if missing.
 */
static void *
real (const char *name, const char *version)
{
  void *f = version ? dlvsym (RTLD_NEXT, name, version) : NULL;

  if (f == NULL)
    f = dlsym (RTLD_NEXT, name);
  if (f == NULL) {
    fprintf (stderr, "clockstep-shim: %s not found\n", name);
    abort ();
  }
  return f;
}

/* Looked up at first use (a race only looks it up twice). */
#define REAL(var, type, name, version)                                  \
  type var = __atomic_load_n (&real_##name, __ATOMIC_ACQUIRE);          \
  if (var == NULL) {                                                    \
    var = (type) real (#name, version);                                 \
    __atomic_store_n (&real_##name, var, __ATOMIC_RELEASE);             \
  }

static clock_gettime_fn real_clock_gettime;
static cond_init_fn real_pthread_cond_init;
static cond_destroy_fn real_pthread_cond_destroy;
static cond_timedwait_fn real_pthread_cond_timedwait;
static cond_clockwait_fn real_pthread_cond_clockwait;

static pthread_mutex_t mono_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t *mono[MAX_MONO];  /* Protected by mono_lock */

/* The step in seconds: the number in $CLOCKSTEP_FILE, 0 without it.
 * errno is kept: callers of time () do not expect it to change.
 */
static int64_t
step_seconds (void)
{
  const char *path = getenv ("CLOCKSTEP_FILE");
  char buf[32];
  ssize_t n;
  int fd, saved = errno;

  if (path == NULL)
    return 0;
  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1) {
    errno = saved;
    return 0;
  }
  n = read (fd, buf, sizeof buf - 1);
  close (fd);
  errno = saved;
  if (n <= 0)
    return 0;
  buf[n] = '\0';
  return strtoll (buf, NULL, 10);
}

static void
real_realtime (struct timespec *ts)
{
  REAL (f, clock_gettime_fn, clock_gettime, NULL);
  f (CLOCK_REALTIME, ts);
}

int
clock_gettime (clockid_t clk, struct timespec *ts)
{
  REAL (f, clock_gettime_fn, clock_gettime, NULL);
  int r = f (clk, ts);

  if (r == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE))
    ts->tv_sec += step_seconds ();
  return r;
}

time_t
time (time_t *t)
{
  struct timespec ts;

  real_realtime (&ts);
  ts.tv_sec += step_seconds ();
  if (t)
    *t = ts.tv_sec;
  return ts.tv_sec;
}

int
gettimeofday (struct timeval *restrict tv, void *restrict tz)
{
  struct timespec ts;

  real_realtime (&ts);
  tv->tv_sec = ts.tv_sec + step_seconds ();
  tv->tv_usec = ts.tv_nsec / 1000;
  if (tz) {
    struct timezone *z = tz;
    z->tz_minuteswest = 0;
    z->tz_dsttime = 0;
  }
  return 0;
}

/* The slot of COND in the table, or -1.  Called with mono_lock. */
static int
mono_find (const pthread_cond_t *cond)
{
  int i;

  for (i = 0; i < MAX_MONO; i++)
    if (mono[i] == cond)
      return i;
  return -1;
}

static int
is_monotonic (const pthread_cond_t *cond)
{
  int r;

  pthread_mutex_lock (&mono_lock);
  r = mono_find (cond) >= 0;
  pthread_mutex_unlock (&mono_lock);
  return r;
}

int
pthread_cond_init (pthread_cond_t *cond, const pthread_condattr_t *attr)
{
  REAL (f, cond_init_fn, pthread_cond_init, "GLIBC_2.3.2");
  clockid_t clk = CLOCK_REALTIME;
  int r = f (cond, attr), i;

  if (r != 0)
    return r;
  if (attr)
    pthread_condattr_getclock (attr, &clk);
  pthread_mutex_lock (&mono_lock);
  /* The memory may have held a monotonic condvar before. */
  i = mono_find (cond);
  if (i >= 0)
    mono[i] = NULL;
  if (clk == CLOCK_MONOTONIC) {
    i = mono_find (NULL);
    if (i < 0) {
      fprintf (stderr, "clockstep-shim: more than %d monotonic condvars\n",
               MAX_MONO);
      abort ();
    }
    mono[i] = cond;
  }
  pthread_mutex_unlock (&mono_lock);
  return 0;
}

int
pthread_cond_destroy (pthread_cond_t *cond)
{
  REAL (f, cond_destroy_fn, pthread_cond_destroy, "GLIBC_2.3.2");
  int i;

  pthread_mutex_lock (&mono_lock);
  i = mono_find (cond);
  if (i >= 0)
    mono[i] = NULL;
  pthread_mutex_unlock (&mono_lock);
  return f (cond);
}

/* Wait on COND until the faked realtime clock reaches ABSTIME, in
 * slices of real time (by pthread_cond_clockwait on CLOCK_REALTIME if
 * CLOCKWAIT, else pthread_cond_timedwait on a realtime condvar).  A
 * wakeup or an error ends the wait at once, as in the real function.
 */
static int
faked_realtime_wait (pthread_cond_t *cond, pthread_mutex_t *mutex,
                     const struct timespec *abstime, int clockwait)
{
  REAL (tw, cond_timedwait_fn, pthread_cond_timedwait, "GLIBC_2.3.2");
  REAL (cw, cond_clockwait_fn, pthread_cond_clockwait, "GLIBC_2.34");

  if (abstime->tv_nsec < 0 || abstime->tv_nsec >= 1000000000)
    return EINVAL;
  for (;;) {
    struct timespec now, until;
    int64_t left_s, left_ns;
    int r;

    real_realtime (&now);
    left_s = (int64_t) abstime->tv_sec - (now.tv_sec + step_seconds ());
    left_ns = abstime->tv_nsec - now.tv_nsec;
    if (left_s < -1)
      return ETIMEDOUT;
    if (left_s > 1)
      left_ns = SLICE_NS;
    else
      left_ns += left_s * 1000000000;
    if (left_ns <= 0)
      return ETIMEDOUT;
    if (left_ns > SLICE_NS)
      left_ns = SLICE_NS;
    until = now;
    until.tv_nsec += left_ns;
    if (until.tv_nsec >= 1000000000) {
      until.tv_sec++;
      until.tv_nsec -= 1000000000;
    }
    r = clockwait ? cw (cond, mutex, CLOCK_REALTIME, &until)
                  : tw (cond, mutex, &until);
    if (r != ETIMEDOUT)
      return r;
  }
}

int
pthread_cond_timedwait (pthread_cond_t *restrict cond,
                        pthread_mutex_t *restrict mutex,
                        const struct timespec *restrict abstime)
{
  REAL (f, cond_timedwait_fn, pthread_cond_timedwait, "GLIBC_2.3.2");

  if (getenv ("CLOCKSTEP_FILE") == NULL || is_monotonic (cond))
    return f (cond, mutex, abstime);
  return faked_realtime_wait (cond, mutex, abstime, 0);
}

int
pthread_cond_clockwait (pthread_cond_t *restrict cond,
                        pthread_mutex_t *restrict mutex, clockid_t clk,
                        const struct timespec *restrict abstime)
{
  REAL (f, cond_clockwait_fn, pthread_cond_clockwait, "GLIBC_2.34");

  if (getenv ("CLOCKSTEP_FILE") == NULL || clk != CLOCK_REALTIME)
    return f (cond, mutex, clk, abstime);
  return faked_realtime_wait (cond, mutex, abstime, 1);
}
