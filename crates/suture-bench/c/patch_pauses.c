/* Patches work() (called by every thread of c/pauses.c) with identical code. */
#include <suture.h>
#ifndef NAME
#define NAME "bench-pauses"
#endif
static long work_same(long x)
{
	return x * 3 + 1;
}
static struct suture_func funcs[] = { { .old_name = "work", .new_func = work_same }, { } };
static struct suture_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
SUTURE_PATCH(p) = { .name = NAME, .objs = objs };
