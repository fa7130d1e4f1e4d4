/*
 * API semantics of the shadow variables: a port of the kernel selftest
 * lib/livepatch/test_klp_shadow_vars.c (same passes, same log shape with
 * pointers printed as PTRn), plus the cases the kernel only WARNs about:
 * alloc of an existing pair, constructor failure, free_all leaving other
 * ids alone, large and aligned data.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../include/suture_shadow.h"

static int failures;

#define CHECK(cond)                                                            \
	do {                                                                   \
		if (!(cond)) {                                                 \
			fprintf(stderr, "%s:%d: FAILED: %s\n", __FILE__,       \
				__LINE__, #cond);                              \
			failures++;                                            \
		}                                                              \
	} while (0)

/* Pointers are logged as PTRn, n in order of first appearance (PTR0 = NULL). */
#define MAX_PTRS 64
static const void *ptrs[MAX_PTRS];
static int nptrs;

static int ptr_id(const void *p)
{
	for (int i = 0; i < nptrs; i++)
		if (ptrs[i] == p)
			return i;
	if (nptrs == MAX_PTRS)
		abort();
	ptrs[nptrs] = p;
	return nptrs++;
}

static int ctor_calls, dtor_calls;

/* The kernel test's constructor: the shadow data holds ctor_data's value. */
static int shadow_ctor(void *obj, void *shadow_data, void *ctor_data)
{
	int **sv = shadow_data;
	int **var = ctor_data;

	(void)obj;
	CHECK(*sv == NULL); /* zero-filled before the constructor runs */
	if (!var)
		return -1;
	*sv = *var;
	ctor_calls++;
	printf("shadow_ctor: PTR%d -> PTR%d\n", ptr_id(sv), ptr_id(*var));
	return 0;
}

static void shadow_dtor(void *obj, void *shadow_data)
{
	int **sv = shadow_data;

	dtor_calls++;
	printf("shadow_dtor(obj=PTR%d, shadow_data=PTR%d)\n", ptr_id(obj), ptr_id(sv));
}

static int failing_ctor(void *obj, void *shadow_data, void *ctor_data)
{
	(void)obj, (void)shadow_data, (void)ctor_data;
	ctor_calls++;
	return -12; /* -ENOMEM */
}

/* Wrappers that log each call the way the kernel test does. */
static void *shadow_get(void *obj, unsigned long id)
{
	void *ret = suture_shadow_get(obj, id);

	printf("suture_shadow_get(obj=PTR%d, id=0x%lx) = PTR%d\n", ptr_id(obj), id, ptr_id(ret));
	return ret;
}

static void *shadow_alloc(void *obj, unsigned long id, size_t size,
			  suture_shadow_ctor_t ctor, void *ctor_data)
{
	int **var = ctor_data;
	void *ret = suture_shadow_alloc(obj, id, size, ctor, ctor_data);

	printf("suture_shadow_alloc(obj=PTR%d, id=0x%lx, size=%zu, ctor=PTR%d, ctor_data=PTR%d) = PTR%d\n",
	       ptr_id(obj), id, size, ptr_id((void *)(uintptr_t)ctor),
	       ptr_id(var ? *var : NULL), ptr_id(ret));
	return ret;
}

static void *shadow_get_or_alloc(void *obj, unsigned long id, size_t size,
				 suture_shadow_ctor_t ctor, void *ctor_data)
{
	int **var = ctor_data;
	void *ret = suture_shadow_get_or_alloc(obj, id, size, ctor, ctor_data);

	printf("suture_shadow_get_or_alloc(obj=PTR%d, id=0x%lx, size=%zu, ctor=PTR%d, ctor_data=PTR%d) = PTR%d\n",
	       ptr_id(obj), id, size, ptr_id((void *)(uintptr_t)ctor),
	       ptr_id(var ? *var : NULL), ptr_id(ret));
	return ret;
}

static void shadow_free(void *obj, unsigned long id, suture_shadow_dtor_t dtor)
{
	suture_shadow_free(obj, id, dtor);
	printf("suture_shadow_free(obj=PTR%d, id=0x%lx, dtor=PTR%d)\n",
	       ptr_id(obj), id, ptr_id((void *)(uintptr_t)dtor));
}

static void shadow_free_all(unsigned long id, suture_shadow_dtor_t dtor)
{
	suture_shadow_free_all(id, dtor);
	printf("suture_shadow_free_all(id=0x%lx, dtor=PTR%d)\n", id, ptr_id((void *)(uintptr_t)dtor));
}

/* Shadow variable wrapper functions: as in the kernel test. */
#define NUM_OBJS 3
#define SV_ID1 0x1234
#define SV_ID2 0x1235

/* Objects that get shadow variables ("struct test_object" in the kernel). */
struct test_object {
	char darray[8]; /* just to have distinct, real addresses */
};

static void kernel_selftest_sequence(void)
{
	struct test_object objs[NUM_OBJS];
	char nfields1[NUM_OBJS];
	int nfields2[NUM_OBJS];
	void *pnfields1[NUM_OBJS], *pnfields2[NUM_OBJS], *pndup[NUM_OBJS];
	void **sv1, **sv2;
	int i, ctors_before;

	ptr_id(NULL);

	/* An empty table: no match. */
	sv1 = shadow_get(&objs[0], SV_ID1);
	CHECK(sv1 == NULL);
	if (!sv1)
		printf("  got expected NULL result\n");

	/* Pass 1: a char and an int shadow variable for each object. */
	for (i = 0; i < NUM_OBJS; i++) {
		pnfields1[i] = &nfields1[i];
		ptr_id(pnfields1[i]);
		ctors_before = ctor_calls;
		if (i % 2)
			sv1 = shadow_alloc(&objs[i], SV_ID1, sizeof(pnfields1[i]),
					   shadow_ctor, &pnfields1[i]);
		else
			sv1 = shadow_get_or_alloc(&objs[i], SV_ID1, sizeof(pnfields1[i]),
						  shadow_ctor, &pnfields1[i]);
		CHECK(sv1 != NULL);
		CHECK(ctor_calls == ctors_before + 1); /* alloc runs the constructor */
		CHECK(sv1 && *sv1 == pnfields1[i]);
		CHECK(((uintptr_t)sv1 & 15) == 0);

		pnfields2[i] = &nfields2[i];
		ptr_id(pnfields2[i]);
		sv2 = shadow_alloc(&objs[i], SV_ID2, sizeof(pnfields2[i]),
				   shadow_ctor, &pnfields2[i]);
		CHECK(sv2 != NULL);
	}

	/* Pass 2: get finds them, pointing where the constructors said. */
	for (i = 0; i < NUM_OBJS; i++) {
		sv1 = shadow_get(&objs[i], SV_ID1);
		CHECK(sv1 && *sv1 == pnfields1[i]);
		if (sv1 && *sv1 == pnfields1[i])
			printf("  got expected PTR%d -> PTR%d result\n", ptr_id(sv1), ptr_id(*sv1));

		sv2 = shadow_get(&objs[i], SV_ID2);
		CHECK(sv2 && *sv2 == pnfields2[i]);
		if (sv2 && *sv2 == pnfields2[i])
			printf("  got expected PTR%d -> PTR%d result\n", ptr_id(sv2), ptr_id(*sv2));
	}

	/* Pass 3: get_or_alloc returns the existing ones, constructor not run. */
	for (i = 0; i < NUM_OBJS; i++) {
		pndup[i] = &nfields1[i];
		ptr_id(pndup[i]);
		ctors_before = ctor_calls;
		sv1 = shadow_get_or_alloc(&objs[i], SV_ID1, sizeof(pndup[i]),
					  shadow_ctor, &pndup[i]);
		CHECK(sv1 == suture_shadow_get(&objs[i], SV_ID1));
		CHECK(ctor_calls == ctors_before);
		CHECK(sv1 && *sv1 == pnfields1[i]);
		if (sv1 && *sv1 == pnfields1[i])
			printf("  got expected PTR%d -> PTR%d result\n", ptr_id(sv1), ptr_id(*sv1));
	}

	/* (Not in the kernel test, which would WARN:) alloc of an existing pair. */
	for (i = 0; i < NUM_OBJS; i++) {
		ctors_before = ctor_calls;
		sv1 = shadow_alloc(&objs[i], SV_ID1, sizeof(pndup[i]), shadow_ctor, &pndup[i]);
		CHECK(sv1 == NULL);
		CHECK(ctor_calls == ctors_before);
		if (!sv1)
			printf("  got expected NULL result\n");
	}

	/* Pass 4: free the <objs[*], SV_ID1> pairs; the destructor runs. */
	for (i = 0; i < NUM_OBJS; i++) {
		int dtors_before = dtor_calls;

		shadow_free(&objs[i], SV_ID1, shadow_dtor);
		CHECK(dtor_calls == dtors_before + 1);
		sv1 = shadow_get(&objs[i], SV_ID1);
		CHECK(sv1 == NULL);
		if (!sv1)
			printf("  got expected NULL result\n");
	}

	/* Pass 5: the <objs[*], SV_ID2> pairs are still there. */
	for (i = 0; i < NUM_OBJS; i++) {
		sv2 = shadow_get(&objs[i], SV_ID2);
		CHECK(sv2 && *sv2 == pnfields2[i]);
		if (sv2 && *sv2 == pnfields2[i])
			printf("  got expected PTR%d -> PTR%d result\n", ptr_id(sv2), ptr_id(*sv2));
	}

	/* Pass 6: free_all frees every <objs[*], SV_ID2>. */
	{
		int dtors_before = dtor_calls;

		shadow_free_all(SV_ID2, shadow_dtor);
		CHECK(dtor_calls == dtors_before + NUM_OBJS);
	}
	for (i = 0; i < NUM_OBJS; i++) {
		sv2 = shadow_get(&objs[i], SV_ID2);
		CHECK(sv2 == NULL);
		if (!sv2)
			printf("  got expected NULL result\n");
	}
}

static void extra_cases(void)
{
	static char objs[4][16];
	int dummy = 7, *pdummy = &dummy;
	int ctors_before;

	printf("-- extra cases\n");

	/* A failing constructor publishes nothing and returns NULL. */
	ctors_before = ctor_calls;
	CHECK(suture_shadow_alloc(objs[0], 1, 8, failing_ctor, NULL) == NULL);
	CHECK(suture_shadow_get_or_alloc(objs[0], 1, 8, failing_ctor, NULL) == NULL);
	CHECK(ctor_calls == ctors_before + 2);
	CHECK(suture_shadow_get(objs[0], 1) == NULL);

	/* NULL constructor: zeroed data; NULL destructor on free. */
	{
		unsigned char *p = suture_shadow_alloc(objs[0], 1, 100000, NULL, NULL);
		size_t zero = 1;

		CHECK(p != NULL);
		for (size_t k = 0; p && k < 100000; k++)
			zero &= p[k] == 0;
		CHECK(zero);
		if (p)
			memset(p, 0xab, 100000); /* the whole size is usable */
		CHECK(suture_shadow_get(objs[0], 1) == p);
		suture_shadow_free(objs[0], 1, NULL);
		CHECK(suture_shadow_get(objs[0], 1) == NULL);
	}

	/* Zero-size data is a valid (unique, non-NULL) shadow variable. */
	{
		void *p = suture_shadow_alloc(objs[1], 2, 0, NULL, NULL);

		CHECK(p != NULL && suture_shadow_get(objs[1], 2) == p);
		suture_shadow_free(objs[1], 2, NULL);
	}

	/* Absurd sizes fail cleanly. */
	CHECK(suture_shadow_alloc(objs[1], 3, (size_t)-1, NULL, NULL) == NULL);
	CHECK(suture_shadow_alloc(objs[1], 3, (size_t)-1 - 16, NULL, NULL) == NULL);
	CHECK(suture_shadow_get(objs[1], 3) == NULL);

	/* Freeing a missing pair is a no-op; the destructor is not run. */
	{
		int dtors_before = dtor_calls;

		suture_shadow_free(objs[2], 99, shadow_dtor);
		suture_shadow_free_all(99, shadow_dtor);
		CHECK(dtor_calls == dtors_before);
	}

	/* free_all(id) frees only that id, on every object; free of one pair
	 * leaves the same id on other objects alone. */
	for (int i = 0; i < 4; i++) {
		CHECK(suture_shadow_alloc(objs[i], 10, 8, shadow_ctor, &pdummy) != NULL);
		CHECK(suture_shadow_alloc(objs[i], 11, 8, shadow_ctor, &pdummy) != NULL);
	}
	suture_shadow_free(objs[0], 10, NULL);
	CHECK(suture_shadow_get(objs[0], 10) == NULL);
	CHECK(suture_shadow_get(objs[1], 10) != NULL);
	CHECK(suture_shadow_get(objs[0], 11) != NULL);
	{
		int dtors_before = dtor_calls;

		suture_shadow_free_all(10, shadow_dtor);
		CHECK(dtor_calls == dtors_before + 3);
	}
	for (int i = 0; i < 4; i++) {
		CHECK(suture_shadow_get(objs[i], 10) == NULL);
		CHECK(suture_shadow_get(objs[i], 11) != NULL);
	}
	suture_shadow_free_all(11, shadow_dtor);
	for (int i = 0; i < 4; i++)
		CHECK(suture_shadow_get(objs[i], 11) == NULL);

	/* Many pairs on one object and many objects on one id (long chains). */
	for (unsigned long id = 0; id < 5000; id++)
		CHECK(suture_shadow_alloc(objs[3], id, sizeof(id), NULL, NULL) != NULL);
	for (unsigned long id = 0; id < 5000; id += 2)
		suture_shadow_free(objs[3], id, NULL);
	for (unsigned long id = 0; id < 5000; id++)
		CHECK((suture_shadow_get(objs[3], id) != NULL) == (id & 1));
	for (unsigned long id = 1; id < 5000; id += 2)
		suture_shadow_free_all(id, NULL);
	for (unsigned long id = 0; id < 5000; id++)
		CHECK(suture_shadow_get(objs[3], id) == NULL);
}

int main(void)
{
	kernel_selftest_sequence();
	extra_cases();
	/* 14 successful + 2 failing constructors; 13 destructors (one of the
	 * 14 pairs was freed with a NULL destructor). */
	CHECK(ctor_calls == 16);
	CHECK(dtor_calls == 13);
	printf("constructors run: %d, destructors run: %d\n", ctor_calls, dtor_calls);
	if (failures) {
		fprintf(stderr, "test_api: %d check(s) FAILED\n", failures);
		return 1;
	}
	printf("test_api: OK\n");
	return 0;
}
