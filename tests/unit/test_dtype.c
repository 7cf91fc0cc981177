/* test_dtype.c - the scalar fp16/bf16 conversions every other part trusts:
 * exhaustive round trips and round-to-nearest-even at the edges; the dtype
 * table (dtype_traits.h) and its dispatch. */
#include <math.h>
#include <string.h>

#include "cpu_attn/dtype_convert.h"
#include "test_util.h"

static void test_f16_round_trip_all(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 0x10000; h++) {
        float f = apex_f16_to_f32((uint16_t)h);
        uint16_t back = apex_f32_to_f16(f);
        if (isnan(f)) assert_true((back & 0x7c00) == 0x7c00 && (back & 0x3ff));
        else assert_int_equal(back, h);
    }
}

static void test_f16_known_values(void **state) {
    (void)state;
    assert_true(apex_f16_to_f32(0x3c00) == 1.0f);
    assert_true(apex_f16_to_f32(0xc000) == -2.0f);
    assert_true(apex_f16_to_f32(0x7bff) == 65504.0f);
    assert_true(apex_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
    assert_int_equal(apex_f32_to_f16(65520.0f), 0x7c00);   /* overflow to inf */
    assert_int_equal(apex_f32_to_f16(65519.0f), 0x7bff);
    assert_int_equal(apex_f32_to_f16(ldexpf(1.0f, -25)), 0x0000); /* tie to even */
    assert_int_equal(apex_f32_to_f16(ldexpf(1.5f, -25)), 0x0001);
    /* 1 + 2^-11 is halfway between 1 and 1+2^-10: ties to even (1.0). */
    assert_int_equal(apex_f32_to_f16(1.0f + ldexpf(1.0f, -11)), 0x3c00);
    assert_int_equal(apex_f32_to_f16(1.0f + 3 * ldexpf(1.0f, -11)), 0x3c02);
}

static void test_bf16(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 0x10000; h++) {
        float f = apex_bf16_to_f32((uint16_t)h);
        if (!isnan(f)) assert_int_equal(apex_f32_to_bf16(f), h);
    }
    assert_int_equal(apex_f32_to_bf16(1.0f + ldexpf(1.0f, -8)), 0x3f80); /* tie to even */
    assert_int_equal(apex_f32_to_bf16(1.0f + ldexpf(3.0f, -8)), 0x3f82);
    assert_true(isnan(apex_bf16_to_f32(apex_f32_to_bf16(NAN))));
}

/* The table: sizes, names, validity, the limits mask, and load/store by
 * apex_dtype agreeing with the conversions above. */
static void test_traits(void **state) {
    (void)state;
    assert_int_equal(apex_dtype_size(APEX_DTYPE_F32), 4);
    assert_int_equal(apex_dtype_size(APEX_DTYPE_F16), 2);
    assert_int_equal(apex_dtype_size(APEX_DTYPE_BF16), 2);
    assert_int_equal(apex_dtype_size((apex_dtype)99), 0);
    assert_string_equal(apex_dtype_name(APEX_DTYPE_BF16), "bf16");
    assert_string_equal(apex_dtype_name(-1), "?");
    assert_true(apex_dtype_valid(APEX_DTYPE_F16) && !apex_dtype_valid(3) && !apex_dtype_valid(-1));
    assert_int_equal(apex_dtype_mask(), (1u << APEX_DTYPE_F32) | (1u << APEX_DTYPE_F16) |
                                            (1u << APEX_DTYPE_BF16));
    const float x = 1.0f + ldexpf(1.0f, -9); /* exact in f32, rounds in f16 and bf16 */
    for (int t = 0; t < 3; t++) {
        uint8_t buf[8] = {0};
        apex_store_f32(buf, (apex_dtype)t, 1, x);
        float want = t == APEX_DTYPE_F16    ? apex_f16_to_f32(apex_f32_to_f16(x))
                     : t == APEX_DTYPE_BF16 ? apex_bf16_to_f32(apex_f32_to_bf16(x))
                                            : x;
        assert_true(apex_load_f32(buf, (apex_dtype)t, 1) == want);
        size_t seen = 0;
        APEX_DISPATCH_KV_DTYPE(t, T, seen = sizeof(T); assert_true(T_to_f32(T_from_f32(x)) == want));
        assert_int_equal(seen, apex_dtype_size((apex_dtype)t));
    }
    int ran = 0;
    APEX_DISPATCH_KV_DTYPE(7, T, ran = 1); /* not an apex_dtype: runs nothing */
    assert_int_equal(ran, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_round_trip_all),
        cmocka_unit_test(test_f16_known_values),
        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_traits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
