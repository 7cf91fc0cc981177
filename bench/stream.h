/* stream.h - a STREAM-style read-bandwidth probe: the baseline that
 * apex-bench compares a memory-bound kernel against, measured in the same
 * process, with the same threads, just before the kernel. */
#ifndef APEX_BENCH_STREAM_H
#define APEX_BENCH_STREAM_H

#include <stddef.h>

typedef struct stream_buf {
    void *p;
    size_t bytes;
} stream_buf;

/* Allocates bytes (rounded to 4 KiB) with the host pool's allocator
 * (csrc/host_mem.c: huge pages, like the KV it is compared with) and writes them with an n_threads
 * team, so pages are really backed and placed where those threads run.
 * Returns 0, or -1 if the allocation failed. */
int stream_init(stream_buf *s, size_t bytes, int n_threads);
void stream_free(stream_buf *s);

/* Best of reps full reads of the buffer by n_threads threads, in GB/s
 * (1e9 bytes/s). Each thread reads its own contiguous slice with the
 * widest vectors the CPU has and eight independent accumulators, so the
 * loop is limited by memory, not by an add chain. */
double stream_read_gbps(const stream_buf *s, int n_threads, int reps);

#endif
