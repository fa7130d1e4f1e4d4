/*
 * suture runtime: shadow variables.
 *
 * A user-space port of the kernel's lib/livepatch/shadow.c. suture loads
 * this file into the target process with its own loader, as a relocatable
 * object built with
 *
 *   cc -c -O2 -fPIC -fno-common -ffunction-sections -fdata-sections \
 *      -fasynchronous-unwind-tables shadow.c
 *
 * so it must not rely on ld.so: no constructors or destructors, no TLS, no
 * IFUNC, no .init_array. All state is zero-initialized (.bss), and the only
 * outside functions are calloc, free, pthread_mutex_lock/unlock and
 * sched_yield, resolved by suture against the target's libc.
 *
 * Layout: a fixed hash table of SUTURE_SHADOW_BUCKETS buckets, each a
 * singly linked list of nodes. New nodes are pushed at the head of their
 * bucket; a node never moves to another bucket and its key never changes.
 *
 * Concurrency:
 *  - Writers (alloc, get_or_alloc, free, free_all) serialize on one pthread
 *    mutex, as the kernel's writers do on klp_shadow_lock. Constructors and
 *    destructors run under it, as in the kernel.
 *  - Readers (get) take no lock. They traverse a bucket with atomic loads,
 *    bracketed by a per-bucket reader counter (see below).
 *
 * Memory reclamation (the kernel uses RCU; we cannot, since the target's
 * threads are unmodified and come and go without registering):
 *
 *   Each bucket has an epoch and two reader counters, active[0] and
 *   active[1]. A reader reads the epoch, increments active[epoch & 1],
 *   walks the chain, and decrements the same counter. A writer that has
 *   unlinked nodes from a bucket runs a "grace period" on that bucket
 *   before freeing them: twice, it flips the epoch (so that new readers use
 *   the other counter) and waits until the counter of the previous parity
 *   reads zero. This is the classic two-counter SRCU scheme.
 *
 *   Why it is sound (every atomic access below is seq_cst, so all of them
 *   lie in one total order S consistent with program order). Take a node N
 *   unlinked by the store U. A reader R can only reach N through loads made
 *   after its increment I (it loads nothing from the bucket before). If
 *   U precedes I in S, all of R's later loads of the links see the chain
 *   without N (or something newer), so R never reaches N. (Nor through an
 *   older unlinked node X: X's writer finished its own grace period before
 *   ours could start, the writers being serialized, so any reader still on
 *   X entered before X was unlinked, i.e. before U: the case below.)
 *   Otherwise I precedes U, hence precedes both of the writer's counter
 *   checks, which come after U in program order. R's counter is one of the
 *   two the writer waits on; a check on it that comes after I in S reads a
 *   value that includes I and, since each reader adds 1 and later removes
 *   1, can only read zero once R's decrement D is in too. That load reads
 *   from (or after) D, so R's traversal happens-before the free. Hence no
 *   reader ever touches freed memory.
 *
 *   Why waiting is bounded and deadlock-free: read-side sections contain no
 *   lock, no call into user code and no wait; they walk a chain whose
 *   length is fixed when they start (insertions go in front of them). Once
 *   the writer has flipped the epoch (only writers flip it, under the
 *   mutex), new readers use the other counter; the only readers that can
 *   still enter the counter being drained are those that read the epoch
 *   before the flip, at most one per thread. So each wait ends as soon as
 *   the threads already inside the bucket walk to its end. Waiting happens
 *   with the writer mutex held, which readers never take. (If suture stops
 *   a thread in the middle of a get, a writer on the same bucket waits until
 *   that thread runs again, which suture always lets it do.)
 *
 *   Per-bucket counters keep readers of different buckets off one another's
 *   cache lines, and let a writer wait only for readers of its own bucket.
 *
 * The data pointer that get/alloc return is the caller's to protect from a
 * concurrent free of the same pair, exactly as in the kernel (where
 * klp_shadow_get also returns after rcu_read_unlock()).
 *
 * Not supported, like malloc: calling from a signal handler (a handler
 * interrupting a get on the same bucket would wait for itself), or fork()
 * while another thread is inside a writer.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "suture_shadow.h"

#ifndef SUTURE_SHADOW_BUCKETS
#define SUTURE_SHADOW_BUCKETS 1024 /* overridable for tests (long chains) */
#endif
_Static_assert((SUTURE_SHADOW_BUCKETS & (SUTURE_SHADOW_BUCKETS - 1)) == 0,
	       "SUTURE_SHADOW_BUCKETS must be a power of two");

/* One shadow variable. Only `next` is written while the node is reachable. */
struct shadow {
	_Atomic(struct shadow *) next; /* bucket chain, walked by readers */
	struct shadow *reclaim;        /* writer-private list once unlinked */
	void *obj;                     /* key: object address */
	unsigned long id;              /* key: id */
	/* The caller's data, 16-byte aligned (calloc's alignment). */
	unsigned char data[] __attribute__((aligned(16)));
};

struct bucket {
	_Atomic(struct shadow *) head;
	atomic_ulong epoch;     /* parity picks the counter new readers use */
	atomic_ulong active[2]; /* readers inside, by epoch parity */
} __attribute__((aligned(64)));

static struct bucket shadow_table[SUTURE_SHADOW_BUCKETS];
static pthread_mutex_t shadow_writer_lock = PTHREAD_MUTEX_INITIALIZER;

static inline struct bucket *bucket_of(const void *obj, unsigned long id)
{
	/* Mix both halves of the key (murmur3 finalizer). */
	uint64_t h = (uint64_t)(uintptr_t)obj ^ ((uint64_t)id * 0x9e3779b97f4a7c15ull);

	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdull;
	h ^= h >> 33;
	return &shadow_table[h & (SUTURE_SHADOW_BUCKETS - 1)];
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield" ::: "memory");
#endif
}

/* Enter a read-side section on b; returns the counter to leave with. */
static inline unsigned read_enter(struct bucket *b)
{
	unsigned idx = (unsigned)(atomic_load(&b->epoch) & 1);

	atomic_fetch_add(&b->active[idx], 1);
	return idx;
}

static inline void read_leave(struct bucket *b, unsigned idx)
{
	atomic_fetch_sub(&b->active[idx], 1);
}

/*
 * Grace period on b (writer lock held): on return, no reader that could
 * have seen a node unlinked from b before the call is still walking b.
 */
static void wait_for_readers(struct bucket *b)
{
	for (int pass = 0; pass < 2; pass++) {
		unsigned idx = (unsigned)(atomic_fetch_add(&b->epoch, 1) & 1);
		unsigned spins = 0;

		while (atomic_load(&b->active[idx]) != 0) {
			if (++spins < 256)
				cpu_relax();
			else
				sched_yield();
		}
	}
}

/* Find <obj, id> in b: inside a read-side section, or with the writer lock. */
static struct shadow *lookup(struct bucket *b, void *obj, unsigned long id)
{
	for (struct shadow *n = atomic_load(&b->head); n; n = atomic_load(&n->next))
		if (n->obj == obj && n->id == id)
			return n;
	return NULL;
}

void *suture_shadow_get(void *obj, unsigned long id)
{
	struct bucket *b = bucket_of(obj, id);
	unsigned idx = read_enter(b);
	struct shadow *n = lookup(b, obj, id);
	/* Only the address is computed here; n is not touched after leaving. */
	void *data = n ? n->data : NULL;

	read_leave(b, idx);
	return data;
}

/* The kernel's __klp_shadow_get_or_alloc(). */
static void *get_or_alloc(void *obj, unsigned long id, size_t size,
			  suture_shadow_ctor_t ctor, void *ctor_data,
			  int fail_if_exists)
{
	struct bucket *b = bucket_of(obj, id);
	struct shadow *n, *cur;
	void *data;

	/* Fast path: it exists already (no lock). */
	data = suture_shadow_get(obj, id);
	if (data)
		return fail_if_exists ? NULL : data;

	/* Allocate outside the lock, zero-filled like the kernel's kzalloc. */
	if (size > SIZE_MAX - sizeof(struct shadow))
		return NULL;
	n = calloc(1, sizeof(struct shadow) + size);
	if (!n)
		return NULL;
	n->obj = obj;
	n->id = id;

	pthread_mutex_lock(&shadow_writer_lock);

	/* Someone may have added it since the check above. */
	cur = lookup(b, obj, id);
	if (cur) {
		data = fail_if_exists ? NULL : (void *)cur->data;
		pthread_mutex_unlock(&shadow_writer_lock);
		free(n);
		return data;
	}

	/* Construct before publishing, so nobody sees half-built data. */
	if (ctor && ctor(obj, n->data, ctor_data) != 0) {
		pthread_mutex_unlock(&shadow_writer_lock);
		free(n);
		return NULL;
	}

	/* Publish at the head; the seq_cst store releases the node's contents. */
	atomic_store_explicit(&n->next, atomic_load(&b->head), memory_order_relaxed);
	atomic_store(&b->head, n);
	data = n->data;

	pthread_mutex_unlock(&shadow_writer_lock);
	return data;
}

void *suture_shadow_alloc(void *obj, unsigned long id, size_t size,
			  suture_shadow_ctor_t ctor, void *ctor_data)
{
	return get_or_alloc(obj, id, size, ctor, ctor_data, 1);
}

void *suture_shadow_get_or_alloc(void *obj, unsigned long id, size_t size,
				 suture_shadow_ctor_t ctor, void *ctor_data)
{
	return get_or_alloc(obj, id, size, ctor, ctor_data, 0);
}

/*
 * Unlink from b every node matching <obj, id> (any obj if match_obj is 0),
 * at most one if `once`; pushes them on *victims. Writer lock held. The
 * unlinked nodes keep their `next`, so readers standing on them go on.
 */
static int unlink_matching(struct bucket *b, void *obj, int match_obj,
			   unsigned long id, int once, struct shadow **victims)
{
	_Atomic(struct shadow *) *link = &b->head;
	struct shadow *n;
	int removed = 0;

	while ((n = atomic_load(link)) != NULL) {
		if (n->id == id && (!match_obj || n->obj == obj)) {
			atomic_store(link, atomic_load(&n->next));
			n->reclaim = *victims;
			*victims = n;
			removed++;
			if (once)
				break;
		} else {
			link = &n->next;
		}
	}
	return removed;
}

/* Run destructors (writer lock held; no reader can reach the nodes). */
static void destroy(struct shadow *victims, suture_shadow_dtor_t dtor)
{
	if (dtor)
		for (struct shadow *n = victims; n; n = n->reclaim)
			dtor(n->obj, n->data);
}

/* Free the nodes (after the writer lock is dropped). */
static void release(struct shadow *victims)
{
	while (victims) {
		struct shadow *next = victims->reclaim;

		free(victims);
		victims = next;
	}
}

void suture_shadow_free(void *obj, unsigned long id, suture_shadow_dtor_t dtor)
{
	struct bucket *b = bucket_of(obj, id);
	struct shadow *victims = NULL;

	pthread_mutex_lock(&shadow_writer_lock);
	if (unlink_matching(b, obj, 1, id, 1, &victims)) {
		wait_for_readers(b);
		destroy(victims, dtor);
	}
	pthread_mutex_unlock(&shadow_writer_lock);
	release(victims);
}

void suture_shadow_free_all(unsigned long id, suture_shadow_dtor_t dtor)
{
	struct shadow *victims = NULL;

	pthread_mutex_lock(&shadow_writer_lock);
	for (size_t i = 0; i < SUTURE_SHADOW_BUCKETS; i++) {
		struct bucket *b = &shadow_table[i];

		if (unlink_matching(b, NULL, 0, id, 0, &victims))
			wait_for_readers(b);
	}
	destroy(victims, dtor);
	pthread_mutex_unlock(&shadow_writer_lock);
	release(victims);
}
