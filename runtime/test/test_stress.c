/*
 * Concurrency test: 8 threads allocate, get and free shadow variables on
 * overlapping keys for a few seconds (STRESS_SECONDS, default 3).
 *
 * Keys: NOBJ objects x three ids.
 *  - ID_STABLE pairs are created on demand by get_or_alloc and never freed
 *    during the run; every thread increments a counter in their data. No
 *    lost update: the counters add up to the increments made, each pair is
 *    constructed once, and get always returns the same data for it.
 *  - ID_CHURN pairs are allocated, looked up and freed at random by all
 *    threads; ID_SWEEP pairs are allocated and removed with free_all. Their
 *    data is never touched outside ctor/dtor (another thread may free it at
 *    any time, so touching it would be the caller's bug), but the lookups
 *    walk chains whose nodes are being unlinked and freed.
 *
 * Constructors and destructors (which run under the writer lock) track each
 * pair's state: a constructor for a pair that exists, or a destructor for
 * one that does not or that was already destroyed, is a failure
 * (duplicate, double free). The runtime's calloc/free are wrapped
 * (-Wl,--wrap) to count live nodes and to poison freed nodes, so a reader
 * walking a freed node would fault or go astray even without a sanitizer.
 * At the end, free_all on every id must leave no node and balance
 * constructors and destructors.
 */
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../include/suture_shadow.h"

#define NTHREADS 8
#define NOBJ 48
enum { ID_STABLE = 0x51, ID_CHURN = 0x52, ID_SWEEP = 0x53, NIDS = 3 };

#define MAGIC_LIVE 0x11feL
#define MAGIC_DEAD 0xdeadL

static atomic_int failures;

#define CHECK(cond)                                                            \
	do {                                                                   \
		if (!(cond)) {                                                 \
			if (atomic_fetch_add(&failures, 1) < 20)               \
				fprintf(stderr, "%s:%d: FAILED: %s\n",         \
					__FILE__, __LINE__, #cond);            \
		}                                                              \
	} while (0)

/* ---- allocation accounting for the runtime (linked with --wrap) ---- */

void *__real_calloc(size_t n, size_t size);
void __real_free(void *p);
static atomic_long live_allocs;

void *__wrap_calloc(size_t n, size_t size)
{
	void *p = __real_calloc(n, size);

	if (p)
		atomic_fetch_add(&live_allocs, 1);
	return p;
}

void __wrap_free(void *p)
{
	if (!p)
		return;
	atomic_fetch_sub(&live_allocs, 1);
	/* Poison: a reader still on this node would follow a wild pointer. */
	memset(p, 0xdd, malloc_usable_size(p));
	__real_free(p);
}

/* ---- keys, data, constructors and destructors ---- */

static char objs[NOBJ][64];

struct sdata {
	long magic;
	void *obj;
	unsigned long id;
	atomic_long hits; /* ID_STABLE: incremented by every thread */
};

static int id_index(unsigned long id)
{
	return id == ID_STABLE ? 0 : id == ID_CHURN ? 1 : 2;
}

static int obj_index(void *obj)
{
	return (int)(((char (*)[64])obj) - objs);
}

/* Pair state, only changed by ctor/dtor, which run under the writer lock. */
static int exists[NOBJ][NIDS];
static atomic_long ctor_calls, dtor_calls;

static int ctor(void *obj, void *shadow_data, void *ctor_data)
{
	struct sdata *d = shadow_data;
	unsigned long id = (unsigned long)(uintptr_t)ctor_data;
	int *e = &exists[obj_index(obj)][id_index(id)];

	CHECK(d->magic == 0 && d->obj == NULL && atomic_load(&d->hits) == 0);
	CHECK(*e == 0); /* never two live copies of one pair */
	*e = 1;
	d->magic = MAGIC_LIVE;
	d->obj = obj;
	d->id = id;
	atomic_fetch_add(&ctor_calls, 1);
	return 0;
}

static void dtor(void *obj, void *shadow_data)
{
	struct sdata *d = shadow_data;
	int *e = &exists[obj_index(obj)][id_index(d->id)];

	CHECK(d->magic == MAGIC_LIVE); /* no double destruction */
	CHECK(d->obj == obj);
	CHECK(*e == 1);
	*e = 0;
	d->magic = MAGIC_DEAD;
	atomic_fetch_add(&dtor_calls, 1);
}

/* ---- the threads ---- */

static _Atomic(struct sdata *) stable_ptr[NOBJ]; /* first data seen per pair */
static atomic_long stable_increments;
static atomic_int stop;

struct stats {
	long ops, allocs, frees, gets, sweeps;
};

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void *worker(void *arg)
{
	struct stats *st = arg;
	uint64_t rnd = 0x9e3779b97f4a7c15ull ^ (uintptr_t)arg;
	long increments = 0;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		uint64_t r = xorshift(&rnd);
		int k = (int)(r % NOBJ);
		void *obj = objs[k];
		unsigned op = (unsigned)(r >> 32) % 100;
		void *p;

		st->ops++;
		if (op < 30) {
			/* Stable pair: find or create, then count. */
			struct sdata *d = suture_shadow_get_or_alloc(obj, ID_STABLE, sizeof(*d), ctor,
								    (void *)(uintptr_t)ID_STABLE);
			struct sdata *first = NULL;

			CHECK(d != NULL);
			if (!d)
				continue;
			if (!atomic_compare_exchange_strong(&stable_ptr[k], &first, d))
				CHECK(first == d);
			CHECK(d->magic == MAGIC_LIVE && d->obj == obj);
			atomic_fetch_add(&d->hits, 1);
			increments++;
			p = suture_shadow_get(obj, ID_STABLE);
			CHECK(p == d);
		} else if (op < 55) {
			/* Lookups racing with frees in the same buckets. */
			p = suture_shadow_get(obj, ID_CHURN);
			CHECK(((uintptr_t)p & 15) == 0);
			p = suture_shadow_get(obj, ID_SWEEP);
			CHECK(((uintptr_t)p & 15) == 0);
			st->gets += 2;
		} else if (op < 70) {
			p = suture_shadow_alloc(obj, ID_CHURN, sizeof(struct sdata), ctor,
						(void *)(uintptr_t)ID_CHURN);
			st->allocs += p != NULL;
		} else if (op < 78) {
			p = suture_shadow_get_or_alloc(obj, ID_CHURN, sizeof(struct sdata), ctor,
						       (void *)(uintptr_t)ID_CHURN);
			CHECK(p != NULL);
		} else if (op < 95) {
			suture_shadow_free(obj, ID_CHURN, dtor);
			st->frees++;
		} else if (op < 99) {
			p = suture_shadow_alloc(obj, ID_SWEEP, sizeof(struct sdata), ctor,
						(void *)(uintptr_t)ID_SWEEP);
			st->allocs += p != NULL;
		} else if ((r >> 20) % 8 == 0) {
			suture_shadow_free_all(ID_SWEEP, dtor);
			st->sweeps++;
		}
	}
	atomic_fetch_add(&stable_increments, increments);
	return NULL;
}

int main(void)
{
	const char *env = getenv("STRESS_SECONDS");
	double seconds = env ? atof(env) : 3.0;
	pthread_t th[NTHREADS];
	struct stats st[NTHREADS];
	struct stats total = {0};
	struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
	long hits = 0, nstable = 0;

	memset(st, 0, sizeof(st));
	for (int i = 0; i < NTHREADS; i++)
		if (pthread_create(&th[i], NULL, worker, &st[i]) != 0) {
			perror("pthread_create");
			return 1;
		}
	nanosleep(&ts, NULL);
	atomic_store(&stop, 1);
	for (int i = 0; i < NTHREADS; i++) {
		pthread_join(th[i], NULL);
		CHECK(st[i].ops > 0 && st[i].frees > 0); /* every thread progressed */
		total.ops += st[i].ops;
		total.allocs += st[i].allocs;
		total.frees += st[i].frees;
		total.gets += st[i].gets;
		total.sweeps += st[i].sweeps;
	}

	/* No lost update: the stable counters hold every increment. */
	for (int k = 0; k < NOBJ; k++) {
		struct sdata *d = suture_shadow_get(objs[k], ID_STABLE);

		CHECK(d == atomic_load(&stable_ptr[k]));
		if (d) {
			hits += atomic_load(&d->hits);
			nstable++;
		}
	}
	CHECK(hits == atomic_load(&stable_increments));

	/* Live nodes = constructed - destroyed, one allocation each. */
	{
		long live = 0;

		for (int k = 0; k < NOBJ; k++)
			for (int i = 0; i < NIDS; i++)
				live += exists[k][i];
		CHECK(live == atomic_load(&ctor_calls) - atomic_load(&dtor_calls));
		CHECK(live == atomic_load(&live_allocs));
		printf("threads %d, %.1fs: %ld ops (%ld gets, %ld allocs, %ld frees, %ld free_all); "
		       "%ld stable pairs, %ld increments; %ld live before cleanup\n",
		       NTHREADS, seconds, total.ops, total.gets, total.allocs, total.frees,
		       total.sweeps, nstable, hits, live);
	}

	/* Final free_all leaves nothing. */
	suture_shadow_free_all(ID_STABLE, dtor);
	suture_shadow_free_all(ID_CHURN, dtor);
	suture_shadow_free_all(ID_SWEEP, dtor);
	for (int k = 0; k < NOBJ; k++)
		for (int i = 0; i < NIDS; i++) {
			CHECK(exists[k][i] == 0);
			CHECK(suture_shadow_get(objs[k], i == 0 ? ID_STABLE : i == 1 ? ID_CHURN : ID_SWEEP) == NULL);
		}
	CHECK(atomic_load(&ctor_calls) == atomic_load(&dtor_calls));
	CHECK(atomic_load(&live_allocs) == 0);
	printf("constructors %ld, destructors %ld, live nodes after free_all %ld\n",
	       atomic_load(&ctor_calls), atomic_load(&dtor_calls), atomic_load(&live_allocs));

	if (atomic_load(&failures)) {
		fprintf(stderr, "test_stress: %d check(s) FAILED\n", atomic_load(&failures));
		return 1;
	}
	printf("test_stress: OK\n");
	return 0;
}
