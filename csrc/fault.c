#include "csrc/fault.h"
#include "csrc/env.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* One process-wide switch: a fault sweep counts every check, whichever
 * context or thread makes it. All fields are accessed atomically. */
static struct {
    uint32_t mask;     /* 0: disarmed */
    uint64_t nth;
    int persist;
    unsigned stall_us;
    uint64_t checks;
    uint64_t injected;
} F;

static pthread_once_t env_once = PTHREAD_ONCE_INIT;

static void arm(uint32_t mask, uint64_t nth, int persist, unsigned stall_us);

static const char *const names[FAULT_N_POINTS] = {
    "host_alloc", "device_alloc", "copy", "launch", "event", "pin", "worker",
};

const char *fault_point_name(fault_point p) {
    return (unsigned)p < FAULT_N_POINTS ? names[p] : "?";
}

/* APEX_FAULT=POINTS:N[:persist]; a malformed value is reported once on
 * stderr and ignored (this switch must never be why a process fails). */
static void read_env(void) {
    const char *stall = apex_env_get(APEX_ENV_FAULT_STALL_US);
    if (stall && *stall) __atomic_store_n(&F.stall_us, (unsigned)strtoul(stall, NULL, 10), __ATOMIC_RELAXED);
    const char *v = apex_env_get(APEX_ENV_FAULT);
    if (!v || !*v) return;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", v);
    char *colon = strchr(buf, ':');
    uint32_t mask = 0;
    char *end = NULL;
    unsigned long long nth = 0;
    int persist = 0, ok = colon != NULL;
    if (ok) {
        *colon = '\0';
        for (char *tok = strtok(buf, ","); tok && ok; tok = strtok(NULL, ",")) {
            int found = !strcmp(tok, "all");
            if (found) mask |= FAULT_ALL;
            for (int p = 0; p < FAULT_N_POINTS && !found; p++)
                if (!strcmp(tok, names[p])) {
                    mask |= 1u << p;
                    found = 1;
                }
            ok = found;
        }
        nth = strtoull(colon + 1, &end, 10);
        if (ok && end && !strcmp(end, ":persist")) persist = 1;
        else if (!end || *end) ok = 0;
    }
    if (!ok || !mask || nth == 0) {
        fprintf(stderr, "apex: APEX_FAULT='%s' ignored (want POINTS:N[:persist], POINTS from "
                        "all,host_alloc,device_alloc,copy,launch,event,pin,worker)\n", v);
        return;
    }
    arm(mask, nth, persist, __atomic_load_n(&F.stall_us, __ATOMIC_RELAXED)); /* not fault_arm: inside the once */
    fprintf(stderr, "apex: fault injection armed from APEX_FAULT='%s'\n", v);
}

int fault_fail(fault_point p) {
    pthread_once(&env_once, read_env);
    uint32_t mask = __atomic_load_n(&F.mask, __ATOMIC_ACQUIRE);
    if (!(mask & (1u << p))) return 0;
    uint64_t n = __atomic_add_fetch(&F.checks, 1, __ATOMIC_ACQ_REL);
    uint64_t nth = __atomic_load_n(&F.nth, __ATOMIC_RELAXED);
    int hit = nth && (n == nth || (n > nth && __atomic_load_n(&F.persist, __ATOMIC_RELAXED)));
    if (hit) __atomic_add_fetch(&F.injected, 1, __ATOMIC_RELAXED);
    return hit;
}

void fault_arm(uint32_t mask, uint64_t nth, int persist, unsigned stall_us) {
    pthread_once(&env_once, read_env); /* a later env read must not undo this */
    arm(mask, nth, persist, stall_us);
}

static void arm(uint32_t mask, uint64_t nth, int persist, unsigned stall_us) {
    __atomic_store_n(&F.mask, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&F.checks, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&F.injected, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&F.nth, nth, __ATOMIC_RELAXED);
    __atomic_store_n(&F.persist, persist, __ATOMIC_RELAXED);
    __atomic_store_n(&F.stall_us, stall_us, __ATOMIC_RELAXED);
    __atomic_store_n(&F.mask, mask & FAULT_ALL, __ATOMIC_RELEASE);
}

void fault_disarm(void) {
    pthread_once(&env_once, read_env);
    __atomic_store_n(&F.mask, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&F.stall_us, 0, __ATOMIC_RELAXED);
}

uint64_t fault_checks(void) { return __atomic_load_n(&F.checks, __ATOMIC_ACQUIRE); }
uint64_t fault_injected(void) { return __atomic_load_n(&F.injected, __ATOMIC_ACQUIRE); }

void fault_worker_stall(void) {
    pthread_once(&env_once, read_env);
    unsigned us = __atomic_load_n(&F.stall_us, __ATOMIC_RELAXED);
    if (us) usleep(us);
}
