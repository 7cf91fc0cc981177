/*
 * cpu_jobs.h - the CPU worker thread of the hybrid pipeline. The engine's
 * thread submits jobs (append K/V rows to the host pool, run CPU attention)
 * and returns at once; the worker runs them in order, each after the device
 * event that says its inputs landed in pinned memory, then publishes its
 * sequence number in a pinned flag word the device's streams wait on.
 * The worker thread is the master of the OpenMP team that runs the kernel,
 * so that team never shares cores with the engine's thread.
 */
#ifndef APEX_CPU_JOBS_H
#define APEX_CPU_JOBS_H

#include <pthread.h>
#include <stdint.h>

#include "csrc/device.h"

typedef struct cpu_job {
    void (*run)(void *arg); /* the work; arg is the caller's (a staging slot) */
    void *arg;
    device_event *wait;     /* event_sync'd before run; NULL = none            */
} cpu_job;

enum { CPU_JOBS_CAPACITY = 256 };

typedef struct cpu_jobs {
    apex_device *dev;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    cpu_job ring[CPU_JOBS_CAPACITY];
    uint32_t submitted;  /* jobs submitted so far (engine thread)  */
    uint32_t finished;   /* jobs finished (worker; under mu)       */
    uint32_t *flag;      /* pinned: == finished, for device waits  */
    unsigned delay_us;   /* tests only: sleep before each job; atomic */
    int running;
    int stop;
} cpu_jobs;

apex_status cpu_jobs_start(cpu_jobs *j, apex_device *dev);
void cpu_jobs_stop(cpu_jobs *j); /* finishes queued jobs, then joins */

/* Queues a job; returns its sequence number (what the flag reaches when it
 * is done). Blocks only when CPU_JOBS_CAPACITY jobs are already pending. */
uint32_t cpu_jobs_submit(cpu_jobs *j, cpu_job job);

/* Blocks until job seq (and all before it) finished. */
void cpu_jobs_wait(cpu_jobs *j, uint32_t seq);
static inline void cpu_jobs_drain(cpu_jobs *j) {
    if (j->running) cpu_jobs_wait(j, j->submitted);
}
/* Tests: makes every later job sleep us microseconds first (a slow CPU). */
static inline void cpu_jobs_set_delay(cpu_jobs *j, unsigned us) {
    __atomic_store_n(&j->delay_us, us, __ATOMIC_RELAXED);
}

/* 1 if job seq has finished (no blocking). */
int cpu_jobs_done(cpu_jobs *j, uint32_t seq);

#endif
