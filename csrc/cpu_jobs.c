#define _GNU_SOURCE /* pthread_setname_np */
#include "csrc/cpu_jobs.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "csrc/error.h"
#include "csrc/fault.h"
#include "csrc/trace.h"

static void *worker_main(void *p) {
    cpu_jobs *j = p;
#ifdef __linux__
    pthread_setname_np(pthread_self(), "apex-cpu-attn");
#endif
    pthread_mutex_lock(&j->mu);
    for (;;) {
        while (j->finished == j->submitted && !j->stop) pthread_cond_wait(&j->cv, &j->mu);
        if (j->finished == j->submitted) break; /* stop, and nothing left */
        cpu_job job = j->ring[j->finished % CPU_JOBS_CAPACITY];
        pthread_mutex_unlock(&j->mu);
        if (job.wait) {
            /* The worker's own wait for its inputs: shown, not summed. */
            TRACE_BEGIN(APEX_TRACE_INFO, "wait for inputs", -1);
            j->dev->iface->event_sync(j->dev, job.wait);
            TRACE_END();
        }
        unsigned delay = __atomic_load_n(&j->delay_us, __ATOMIC_RELAXED);
        if (delay) usleep(delay);
        fault_worker_stall();
        job.run(job.arg);
        pthread_mutex_lock(&j->mu);
        j->finished++;
        /* Release: the device (or a waiting host thread) that sees the flag
         * must also see everything the job wrote. */
        __atomic_store_n(j->flag, j->finished, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&j->cv);
    }
    pthread_mutex_unlock(&j->mu);
    return NULL;
}

apex_status cpu_jobs_start(cpu_jobs *j, apex_device *dev) {
    memset(j, 0, sizeof *j);
    j->dev = dev;
    if (fault_fail(FAULT_WORKER))
        return apex_fail(APEX_ERR_INTERNAL, "cannot start the CPU worker thread (injected EAGAIN)");
    apex_status st = dev->iface->host_alloc(dev, 64, (void **)&j->flag);
    if (st) return st;
    *j->flag = 0;
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    if (pthread_create(&j->thread, NULL, worker_main, j) != 0) {
        pthread_mutex_destroy(&j->mu);
        pthread_cond_destroy(&j->cv);
        dev->iface->host_free(dev, j->flag);
        j->flag = NULL;
        return apex_fail(APEX_ERR_INTERNAL, "cannot start the CPU worker thread");
    }
    j->running = 1;
    return APEX_OK;
}

void cpu_jobs_stop(cpu_jobs *j) {
    if (!j->running) return;
    pthread_mutex_lock(&j->mu);
    j->stop = 1;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    pthread_join(j->thread, NULL);
    pthread_mutex_destroy(&j->mu);
    pthread_cond_destroy(&j->cv);
    j->dev->iface->host_free(j->dev, j->flag);
    j->running = 0;
}

uint32_t cpu_jobs_submit(cpu_jobs *j, cpu_job job) {
    pthread_mutex_lock(&j->mu);
    while (j->submitted - j->finished >= CPU_JOBS_CAPACITY) pthread_cond_wait(&j->cv, &j->mu);
    j->ring[j->submitted % CPU_JOBS_CAPACITY] = job;
    uint32_t seq = ++j->submitted;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    return seq;
}

void cpu_jobs_wait(cpu_jobs *j, uint32_t seq) {
    pthread_mutex_lock(&j->mu);
    while ((int32_t)(j->finished - seq) < 0) pthread_cond_wait(&j->cv, &j->mu);
    pthread_mutex_unlock(&j->mu);
}

int cpu_jobs_done(cpu_jobs *j, uint32_t seq) {
    pthread_mutex_lock(&j->mu);
    int done = (int32_t)(j->finished - seq) >= 0;
    pthread_mutex_unlock(&j->mu);
    return done;
}
