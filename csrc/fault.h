/*
 * fault.h - fault injection: make the Nth failure point fail.
 *
 * Every place where APEX depends on something that can fail at run time
 * (an allocation, a copy, a kernel launch, an event, pinning, the CPU
 * worker) asks fault_fail(point) first and, when it says 1, fails exactly
 * as the real thing would (same status, a message saying "injected").
 * Disarmed (the normal case) that is one relaxed atomic load.
 *
 * Compiled in always, not only in test builds: the cost is that one load
 * per call of something far more expensive, and it lets the very library
 * that ships (and the llama.cpp backend built from it) be fault-tested.
 *
 * Arming: fault_arm() from a test, or the environment, read at the first
 * check: APEX_FAULT=POINTS:N[:persist], POINTS a comma list of point names
 * (fault_point_name) or "all": the Nth check of any listed point fails (and,
 * with persist, every one after it). APEX_FAULT_STALL_US=U makes the CPU
 * worker sleep U microseconds before every job (a stalled worker).
 */
#ifndef APEX_FAULT_H
#define APEX_FAULT_H

#include <stdint.h>

typedef enum fault_point {
    FAULT_HOST_ALLOC = 0, /* host memory: the KV pool's mapping, pinned host buffers */
    FAULT_DEVICE_ALLOC,   /* device memory                                 */
    FAULT_COPY,           /* memcpy_async                                  */
    FAULT_LAUNCH,         /* a kernel launch                               */
    FAULT_EVENT,          /* stream/event create, record, wait, flag wait  */
    FAULT_PIN,            /* registering host memory with the device       */
    FAULT_WORKER,         /* CPU worker start, topology                    */
    FAULT_N_POINTS
} fault_point;

#define FAULT_ALL ((1u << FAULT_N_POINTS) - 1)

/* 1 if this check of point p must fail (counts the check when armed). */
int fault_fail(fault_point p);

/* Arms: the nth (1-based) check of a point in mask fails; persist: and
 * every later one. nth 0 disarms (checks are still counted). Resets the
 * count. stall_us: CPU worker sleep before each job (0: none). */
void fault_arm(uint32_t mask, uint64_t nth, int persist, unsigned stall_us);
void fault_disarm(void);

/* Checks of armed points since fault_arm, and failures injected. */
uint64_t fault_checks(void);
uint64_t fault_injected(void);

/* The CPU worker calls this before each job: sleeps while a stall is armed. */
void fault_worker_stall(void);

const char *fault_point_name(fault_point p); /* "host_alloc", ... */

#endif
