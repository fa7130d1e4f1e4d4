/*
 * suture runtime: system states (kernel: klp_get_state, klp_get_prev_state).
 * suture keeps the table below up to date from outside the process (at the
 * start and end of each transition and around callbacks): per state id, the
 * newest listed patch's `struct suture_state` and, during a transition, the
 * one of the newest patch before the patch in transition.
 */
#include "suture.h"

#define SUTURE_STATE_SLOTS 64

struct suture_state_slot {
	unsigned long id; /* 0: unused */
	struct suture_state *cur;
	struct suture_state *prev;
};

/* Written by suture; read here. Layout known to suture (runtime.rs). */
struct suture_state_slot suture_state_table[SUTURE_STATE_SLOTS];

static struct suture_state_slot *slot(unsigned long id)
{
	for (int i = 0; i < SUTURE_STATE_SLOTS; i++)
		if (__atomic_load_n(&suture_state_table[i].id, __ATOMIC_ACQUIRE) == id)
			return &suture_state_table[i];
	return 0;
}

struct suture_state *suture_get_state(unsigned long id)
{
	struct suture_state_slot *s = slot(id);
	return s ? __atomic_load_n(&s->cur, __ATOMIC_ACQUIRE) : 0;
}

struct suture_state *suture_get_prev_state(unsigned long id)
{
	struct suture_state_slot *s = slot(id);
	return s ? __atomic_load_n(&s->prev, __ATOMIC_ACQUIRE) : 0;
}
