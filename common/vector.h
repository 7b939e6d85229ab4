/* ext4fs: a growable array of one element type.
 *
 *   DEFINE_VECTOR_TYPE (run_vector, struct ext4fs_run);
 *
 * declares
 *
 *   typedef struct { struct ext4fs_run *ptr; size_t len, cap; } run_vector;
 *
 * (an all-zero one is empty and needs no initialisation) and, for it:
 *
 *   int run_vector_reserve (run_vector *v, size_t n)  room for n more
 *   int run_vector_append (run_vector *v, struct ext4fs_run e)
 *   void run_vector_reset (run_vector *v)             free, back to empty
 *
 * reserve and append return 0, or -1 with errno = ENOMEM (out of
 * memory, or a size that does not fit in size_t) and the vector as it
 * was.  Capacity doubles (at least VECTOR_MIN_CAP elements), so
 * appending is amortised O(1).  No locking: the caller's.
 */
#ifndef EXT4FS_VECTOR_H
#define EXT4FS_VECTOR_H

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>

#define VECTOR_MIN_CAP 16

/* The new array for len + n elements of size elem, or NULL with errno
 * set.  On success *cap is its capacity.  The generated functions call
 * this only when the room is short.
 */
static inline void *
vector_grow (void *ptr, size_t *cap, size_t len, size_t n, size_t elem)
{
  size_t need, ncap, bytes;
  void *p;

  if (__builtin_add_overflow (len, n, &need))
    goto too_big;
  if (__builtin_mul_overflow (*cap, 2, &ncap))
    ncap = need;
  if (ncap < VECTOR_MIN_CAP)
    ncap = VECTOR_MIN_CAP;
  if (ncap < need)
    ncap = need;
  if (__builtin_mul_overflow (ncap, elem, &bytes)) {
    /* Doubling overflows: try exactly what is needed. */
    ncap = need;
    if (__builtin_mul_overflow (ncap, elem, &bytes))
      goto too_big;
  }
  p = realloc (ptr, bytes);
  if (p == NULL)
    return NULL;                /* errno = ENOMEM, ptr untouched */
  *cap = ncap;
  return p;

 too_big:
  errno = ENOMEM;
  return NULL;
}

#define DEFINE_VECTOR_TYPE(name, elem_type)                             \
  typedef struct {                                                      \
    elem_type *ptr;                                                     \
    size_t len;                 /* elements in use */                   \
    size_t cap;                 /* elements allocated */                \
  } name;                                                               \
                                                                        \
  static inline __attribute__ ((__unused__)) int                        \
  name##_reserve (name *v, size_t n)                                    \
  {                                                                     \
    void *p;                                                            \
                                                                        \
    if (n <= v->cap - v->len)                                           \
      return 0;                                                         \
    p = vector_grow (v->ptr, &v->cap, v->len, n, sizeof (elem_type));   \
    if (p == NULL)                                                      \
      return -1;                                                        \
    v->ptr = p;                                                         \
    return 0;                                                           \
  }                                                                     \
                                                                        \
  static inline __attribute__ ((__unused__)) int                        \
  name##_append (name *v, elem_type e)                                  \
  {                                                                     \
    if (v->len == v->cap && name##_reserve (v, 1) == -1)                \
      return -1;                                                        \
    v->ptr[v->len++] = e;                                               \
    return 0;                                                           \
  }                                                                     \
                                                                        \
  static inline __attribute__ ((__unused__)) void                       \
  name##_reset (name *v)                                                \
  {                                                                     \
    free (v->ptr);                                                      \
    v->ptr = NULL;                                                      \
    v->len = v->cap = 0;                                                \
  }                                                                     \
                                                                        \
  /* So that the macro's use can end with a semicolon. */               \
  struct name##_dummy_ { int unused_; }

#endif /* EXT4FS_VECTOR_H */
