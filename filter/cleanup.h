/* ext4fs: scoped locks and frees through the cleanup attribute, so an
 * early return cannot leak a lock.  Every pthread call is asserted.
 */
#ifndef EXT4FS_CLEANUP_H
#define EXT4FS_CLEANUP_H

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>

static inline void
cleanup_mutex_unlock (pthread_mutex_t **ptr)
{
  if (*ptr) {
    int r = pthread_mutex_unlock (*ptr);
    assert (r == 0);
    (void) r;
  }
}

static inline void
cleanup_rwlock_unlock (pthread_rwlock_t **ptr)
{
  if (*ptr) {
    int r = pthread_rwlock_unlock (*ptr);
    assert (r == 0);
    (void) r;
  }
}

static inline void
cleanup_free (void *ptr)
{
  free (*(void **) ptr);
}

#define CLEANUP_FREE __attribute__ ((cleanup (cleanup_free)))
/* A rwlock taken by a function, held until the end of the scope (NULL:
 * none).
 */
#define CLEANUP_RWUNLOCK __attribute__ ((cleanup (cleanup_rwlock_unlock)))

#define EXT4FS_CAT2(a, b) a##b
#define EXT4FS_CAT(a, b) EXT4FS_CAT2 (a, b)
#define EXT4FS_UNIQUE(name) EXT4FS_CAT (name, __LINE__)

#define ACQUIRE_LOCK_FOR_CURRENT_SCOPE(mutex)                           \
  __attribute__ ((cleanup (cleanup_mutex_unlock)))                      \
  pthread_mutex_t *EXT4FS_UNIQUE (_lock) = (mutex);                     \
  do {                                                                  \
    int _r = pthread_mutex_lock (EXT4FS_UNIQUE (_lock));                \
    assert (_r == 0);                                                   \
    (void) _r;                                                          \
  } while (0)

#define ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE(rwlock)                        \
  __attribute__ ((cleanup (cleanup_rwlock_unlock)))                     \
  pthread_rwlock_t *EXT4FS_UNIQUE (_rwlock) = (rwlock);                 \
  do {                                                                  \
    int _r = pthread_rwlock_rdlock (EXT4FS_UNIQUE (_rwlock));           \
    assert (_r == 0);                                                   \
    (void) _r;                                                          \
  } while (0)

#define ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE(rwlock)                        \
  __attribute__ ((cleanup (cleanup_rwlock_unlock)))                     \
  pthread_rwlock_t *EXT4FS_UNIQUE (_rwlock) = (rwlock);                 \
  do {                                                                  \
    int _r = pthread_rwlock_wrlock (EXT4FS_UNIQUE (_rwlock));           \
    assert (_r == 0);                                                   \
    (void) _r;                                                          \
  } while (0)

#endif /* EXT4FS_CLEANUP_H */
