/* Cumulative patch that changes only other(): applied after patch_same.c it
 * replaces it, so triv, slow50 and holder get nop entries, dropped at the
 * end of its transition (their original bytes come back). */
#include <suture.h>
#ifndef NAME
#define NAME "bench-replace"
#endif
static long other_v2(long x)
{
	return x * 3 + 1;
}
static struct suture_func funcs[] = { { .old_name = "other", .new_func = other_v2 }, { } };
static struct suture_object objs[] = { { .name = NULL, .funcs = funcs }, { } };
SUTURE_PATCH(p) = { .name = NAME, .replace = 1, .objs = objs };
