/*
 * suture runtime: shadow variables (user-space port of the kernel's
 * lib/livepatch/shadow.c API, see Documentation/livepatch/shadow-vars.rst).
 *
 * A shadow variable is a block of data attached to an existing object
 * without changing that object's layout: it is keyed by the pair
 * <obj address, id>, where `obj` is only used as a key (never dereferenced)
 * and `id` is chosen by the patch author (distinct uses, distinct ids).
 *
 * All functions are safe to call from any number of threads at once.
 * suture_shadow_get() takes no lock (it never blocks on a writer); the
 * allocating and freeing functions serialize with one another.
 *
 * Rules (the same as the kernel's):
 *  - The pointer returned by get/alloc stays valid until someone frees that
 *    <obj, id> pair; coordinating data use with frees is the caller's job.
 *  - Constructors and destructors run with the writer lock held: they must
 *    not call suture_shadow_alloc/get_or_alloc/free/free_all (get is fine).
 *  - Not async-signal-safe (it uses malloc): do not call from signal
 *    handlers.
 *
 * Shadow data is zero-filled before the constructor runs, and is aligned to
 * 16 bytes (enough for any scalar type, like malloc's).
 */
#ifndef SUTURE_SHADOW_H
#define SUTURE_SHADOW_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Constructor: fills in new shadow data (already zeroed) before anyone can
 * see it. Return 0 on success; any other value makes the allocation fail
 * (nothing is published, the memory is freed, NULL is returned).
 */
typedef int (*suture_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);

/* Destructor: releases what shadow_data refers to; the data is freed after. */
typedef void (*suture_shadow_dtor_t)(void *obj, void *shadow_data);

/* The data of <obj, id>, or NULL if there is none. Lock-free. */
void *suture_shadow_get(void *obj, unsigned long id);

/*
 * Attach `size` bytes of zeroed data to <obj, id>, run `ctor` (may be NULL)
 * on it, then publish it. Returns the new data, or NULL if <obj, id>
 * already exists (no message is printed), if memory runs out, or if the
 * constructor fails.
 */
void *suture_shadow_alloc(void *obj, unsigned long id, size_t size,
			  suture_shadow_ctor_t ctor, void *ctor_data);

/*
 * Like suture_shadow_alloc(), except that if <obj, id> already exists its
 * data is returned and `ctor` is not run. When several threads race on a
 * missing pair, exactly one constructs it and all get the same data.
 */
void *suture_shadow_get_or_alloc(void *obj, unsigned long id, size_t size,
				 suture_shadow_ctor_t ctor, void *ctor_data);

/* Detach <obj, id>: run `dtor` (may be NULL) on its data, then free it. */
void suture_shadow_free(void *obj, unsigned long id, suture_shadow_dtor_t dtor);

/* Detach every shadow variable with this id, whatever its object, running
 * `dtor` (may be NULL) on each before freeing it. */
void suture_shadow_free_all(unsigned long id, suture_shadow_dtor_t dtor);

#ifdef __cplusplus
}
#endif

#endif /* SUTURE_SHADOW_H */
