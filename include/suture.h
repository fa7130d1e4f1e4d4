/*
 * suture.h - describe a live patch for a running process.
 *
 * A patch is a relocatable ELF object (cc -c) built from C. It carries the
 * new code and one SUTURE_PATCH descriptor, shaped like the Linux kernel's
 * klp_patch / klp_object / klp_func. Build it with
 *
 *     suture build fix.c -o fix.o
 *
 * or by hand with the flags below (SUTURE_CFLAGS in README.md):
 *
 *     cc -c -O2 -fPIC -fno-common -ffunction-sections -fdata-sections \
 *        -fasynchronous-unwind-tables -I <suture>/include fix.c -o fix.o
 *
 * Example:
 *
 *     #include <suture.h>
 *     static int fixed_parse(const char *s) { ... }
 *     static struct suture_func funcs[] = {
 *             { .old_name = "parse", .new_func = fixed_parse },
 *             { }
 *     };
 *     static struct suture_object objs[] = {
 *             { .name = NULL, .funcs = funcs },
 *             { }
 *     };
 *     SUTURE_PATCH(fix) = { .name = "fix-parse", .objs = objs };
 *
 * Using the target's own symbols from patch code: declare them `extern` and
 * use them. suture resolves an undefined name in this order:
 *   1. an alias declared with SUTURE_SYMBOL (explicit object and sympos);
 *   2. the objects named in the patch, in order: their .symtab (static
 *      functions and variables included) or, when stripped, .dynsym; a name
 *      that several local symbols share is an error listing the candidates;
 *   3. the exported (.dynsym) definitions of every loaded object, in load
 *      order, as the dynamic linker would find them (libc's snprintf, ...).
 *
 * The layout of these structs is the ABI between a patch file and suture
 * (SUTURE_ABI_VERSION); do not reorder fields.
 */
#ifndef SUTURE_H
#define SUTURE_H

#include <stddef.h> /* NULL */

#define SUTURE_ABI_VERSION 1

struct suture_object;

/* One replaced function (kernel: klp_func). */
struct suture_func {
	/* Name of the function to replace in the object. */
	const char *old_name;
	/* The replacement; same signature as the original. */
	void *new_func;
	/*
	 * 0: old_name must be unique among the object's symbols (local
	 * symbols included). N: the N-th symbol of that name, in symbol
	 * table order (as `suture check` lists them).
	 */
	unsigned long old_sympos;
};

/* Called inside the target around patching (kernel: klp_callbacks). */
struct suture_callbacks {
	/* Non-zero cancels the enable. */
	int (*pre_patch)(struct suture_object *obj);
	void (*post_patch)(struct suture_object *obj);
	void (*pre_unpatch)(struct suture_object *obj);
	void (*post_unpatch)(struct suture_object *obj);
};

/* One object of the target: the main program or a shared object. */
struct suture_object {
	/* NULL: the main program; else a soname or file name ("libfoo.so.1"). */
	const char *name;
	/* Array terminated by an entry whose old_name is NULL. */
	struct suture_func *funcs;
	struct suture_callbacks callbacks;
	/* Optional lowercase hex GNU build-id; the patch refuses other builds. */
	const char *build_id;
};

/* A system state this patch establishes (kernel: klp_state). */
struct suture_state {
	/* Non-zero; the array ends with an entry whose id is 0. */
	unsigned long id;
	unsigned int version;
	void *data;
};

/* The patch (kernel: klp_patch). */
struct suture_patch {
	/* Defaults to the patch file's stem when NULL. */
	const char *name;
	/* Array terminated by an entry whose name and funcs are both NULL. */
	struct suture_object *objs;
	/* Optional array terminated by an entry whose id is 0. */
	struct suture_state *states;
	/* Non-zero: a cumulative patch that replaces every earlier one. */
	int replace;
};

/* An explicit reference to a symbol of the target (see the top comment). */
struct suture_symbol {
	const char *alias;  /* the extern name used in the patch code */
	const char *object; /* NULL: main program; else soname or file name */
	const char *name;   /* symbol name in that object */
	unsigned long sympos;
};

/*
 * SUTURE_SYMBOL(alias, object, name, sympos): make the extern `alias` refer
 * to the sympos-th symbol `name` of `object` (NULL for the main program):
 *
 *     extern int counter2;
 *     SUTURE_SYMBOL(counter2, NULL, "counter", 2);
 */
#define SUTURE_SYMBOL(alias, object, name, sympos)                            \
	static const struct suture_symbol __suture_symbol_##alias              \
		__attribute__((used, section(".suture.symbols"))) = {          \
			#alias, object, name, sympos }

/* Declare the patch descriptor; exactly one per patch file. */
#define SUTURE_PATCH(ident)                                                    \
	const unsigned int __suture_abi_##ident                                \
		__attribute__((used, section(".suture.abi"))) =                \
			SUTURE_ABI_VERSION;                                    \
	struct suture_patch ident __attribute__((used, section(".suture.patch")))

/*
 * System states (kernel: klp_get_state / klp_get_prev_state): the state
 * `id` of the newest patch that declares it (the calling patch, in its own
 * callbacks and functions), and during a transition the state of the patch
 * before it, so that a cumulative patch can take over what an earlier one
 * set up. NULL when there is none. Loaded with suture's runtime.
 */
struct suture_state *suture_get_state(unsigned long id);
struct suture_state *suture_get_prev_state(unsigned long id);

/*
 * Shadow variables (kernel: klp_shadow_*): data attached to an existing
 * object of the target without changing its layout, usable from patch
 * functions and callbacks. suture loads the code behind them into the
 * target with the first patch that calls one of them.
 */
#include "suture_shadow.h"

#endif /* SUTURE_H */
