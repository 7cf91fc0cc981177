#include "csrc/cpu_workers.h"

#include <omp.h>
#include <stdatomic.h>
#include <string.h>

#include "csrc/error.h"
#include "csrc/fault.h"

static atomic_uint next_id = 1;

/* The instance this thread's OpenMP team was last pinned for. */
static _Thread_local unsigned pinned_for;

/* The cores local to PCI device busid (within the current set), or none. */
static void restrict_near(cpu_workers *w, const char *busid) {
    hwloc_obj_t pci = hwloc_get_pcidev_by_busidstring(w->topo, busid);
    hwloc_obj_t host = pci ? hwloc_get_non_io_ancestor_obj(w->topo, pci) : NULL;
    if (!host || !host->cpuset) return;
    hwloc_bitmap_t near = hwloc_bitmap_dup(host->cpuset);
    if (!near) return;
    hwloc_bitmap_and(near, near, w->cpuset);
    /* A GPU whose local cores this process may not use: keep them all. */
    if (!hwloc_bitmap_iszero(near)) hwloc_bitmap_copy(w->cpuset, near);
    hwloc_bitmap_free(near);
}

apex_status cpu_workers_init(cpu_workers *w, const char *cpu_set,
                             int32_t n_threads, const char *near_pci) {
    memset(w, 0, sizeof *w);
    if (n_threads < 0 || n_threads > 1024)
        return apex_fail(APEX_ERR_INVALID_ARG,
                         "n_threads %d out of range [0, 1024]", n_threads);
    if (fault_fail(FAULT_WORKER))
        return apex_fail(APEX_ERR_INTERNAL, "hwloc could not load the topology (injected)");
    if (hwloc_topology_init(&w->topo) == 0 && near_pci)
        hwloc_topology_set_io_types_filter(w->topo, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    if (!w->topo || hwloc_topology_load(w->topo) != 0) {
        if (w->topo) hwloc_topology_destroy(w->topo);
        w->topo = NULL;
        return apex_fail(APEX_ERR_INTERNAL, "hwloc could not load the topology");
    }
    w->cpuset = hwloc_bitmap_alloc();
    if (!w->cpuset) {
        cpu_workers_destroy(w);
        return apex_fail(APEX_ERR_NO_MEMORY, "out of memory for a cpuset");
    }
    /* Start from the cores this process may run on. */
    if (hwloc_get_cpubind(w->topo, w->cpuset, HWLOC_CPUBIND_PROCESS) != 0 ||
        hwloc_bitmap_iszero(w->cpuset))
        hwloc_bitmap_copy(w->cpuset, hwloc_topology_get_allowed_cpuset(w->topo));
    if (cpu_set && cpu_set[0]) {
        hwloc_bitmap_t want = hwloc_bitmap_alloc();
        if (!want || hwloc_bitmap_list_sscanf(want, cpu_set) != 0) {
            hwloc_bitmap_free(want);
            cpu_workers_destroy(w);
            return apex_fail(APEX_ERR_INVALID_ARG,
                             "cpu_set '%s' is not a cpu list like \"0-3,8\"", cpu_set);
        }
        hwloc_bitmap_and(w->cpuset, w->cpuset, want);
        hwloc_bitmap_free(want);
        if (hwloc_bitmap_iszero(w->cpuset)) {
            cpu_workers_destroy(w);
            return apex_fail(APEX_ERR_INVALID_ARG,
                             "cpu_set '%s' names no core this process may use", cpu_set);
        }
    } else if (near_pci && near_pci[0]) {
        restrict_near(w, near_pci);
    }
    int n_cores = hwloc_get_nbobjs_inside_cpuset_by_type(w->topo, w->cpuset,
                                                         HWLOC_OBJ_CORE);
    if (n_cores <= 0) n_cores = hwloc_bitmap_weight(w->cpuset);
    if (n_cores <= 0) n_cores = 1;
    w->n_threads = n_threads ? n_threads : n_cores;
    w->id = atomic_fetch_add(&next_id, 1);
    return APEX_OK;
}

void cpu_workers_destroy(cpu_workers *w) {
    if (w->cpuset) hwloc_bitmap_free(w->cpuset);
    if (w->topo) hwloc_topology_destroy(w->topo);
    memset(w, 0, sizeof *w);
}

void cpu_workers_pin(const cpu_workers *w) {
    if (pinned_for == w->id) return;
    int n_cores = hwloc_get_nbobjs_inside_cpuset_by_type(w->topo, w->cpuset,
                                                         HWLOC_OBJ_CORE);
#pragma omp parallel num_threads(w->n_threads)
    {
        int t = omp_get_thread_num();
        if (t > 0) {
            hwloc_obj_t core = n_cores > 0
                ? hwloc_get_obj_inside_cpuset_by_type(w->topo, w->cpuset,
                                                      HWLOC_OBJ_CORE, t % n_cores)
                : NULL;
            hwloc_bitmap_t set = hwloc_bitmap_dup(core ? core->cpuset : w->cpuset);
            if (set) {
                hwloc_bitmap_and(set, set, w->cpuset);
                hwloc_set_cpubind(w->topo, set, HWLOC_CPUBIND_THREAD);
                hwloc_bitmap_free(set);
            }
        }
    }
    pinned_for = w->id;
}

hwloc_nodeset_t cpu_workers_nodeset(const cpu_workers *w) {
    hwloc_nodeset_t ns = hwloc_bitmap_alloc();
    if (!ns) return NULL;
    hwloc_cpuset_to_nodeset(w->topo, w->cpuset, ns);
    if (hwloc_bitmap_iszero(ns)) {
        hwloc_bitmap_free(ns);
        return NULL;
    }
    return ns;
}
