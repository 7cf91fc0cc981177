#include "cpu_attn/cpu_attn_impl.h"
static void sp(const cpu_attn_span *s, float *m, float *l, float *acc, float *scratch) { cpu_attn_kernel_scalar.span(s,m,l,acc,scratch); }
static void st(void *out, apex_dtype dt, const float *src, float mul, int32_t n) { cpu_attn_kernel_scalar.store(out,dt,src,mul,n); }
const cpu_attn_kernel cpu_attn_kernel_avx2 = {sp, st};
