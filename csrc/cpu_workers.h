/*
 * cpu_workers.h - the CPU side's topology and threads: the hwloc topology,
 * the set of cores APEX may use, the worker count, and the pinning of the
 * OpenMP team that runs the CPU kernel.
 */
#ifndef APEX_CPU_WORKERS_H
#define APEX_CPU_WORKERS_H

#include <hwloc.h>

#include "apex/apex.h"

typedef struct cpu_workers {
    hwloc_topology_t topo;
    hwloc_bitmap_t cpuset;  /* cores APEX may use                      */
    int32_t n_threads;      /* OpenMP team size for the CPU kernel     */
    unsigned id;            /* distinguishes instances for re-pinning  */
} cpu_workers;

/* cpu_set: hwloc list syntax or NULL/"" for every core the process may use
 * - or, when near_pci names a PCI device (a GPU's bus id), the cores local
 * to it. n_threads 0 = one per core in the set. */
apex_status cpu_workers_init(cpu_workers *w, const char *cpu_set,
                             int32_t n_threads, const char *near_pci);
void cpu_workers_destroy(cpu_workers *w);

/* Binds the team threads 1..n-1 of the calling thread's OpenMP team to one
 * core each of the set. The calling (engine) thread, team thread 0, keeps
 * its own binding: APEX never changes the engine thread's affinity. Cheap
 * when this thread's team is already pinned for w. */
void cpu_workers_pin(const cpu_workers *w);

/* The NUMA nodes local to the worker cores (for host-tier allocation).
 * Caller frees with hwloc_bitmap_free. NULL if unknown. */
hwloc_nodeset_t cpu_workers_nodeset(const cpu_workers *w);

#endif
