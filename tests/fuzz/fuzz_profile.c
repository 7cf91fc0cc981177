/*
 * fuzz_profile.c - the profile JSON (APEX_PROFILE, the cached profile
 * files) under libFuzzer: the JSON reader on arbitrary bytes, and the
 * profile parser. Checked: no crash, leak or UB on any input; a rejected
 * profile has a message; an accepted one passes validation and survives a
 * write/parse round trip unchanged (the text written from it parses back
 * to a profile that writes the same text).
 */
#include "csrc/sched/json.h"
#include "csrc/sched/sched.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[256] = "";
    jnode *root = json_parse((const char *)data, size, err, sizeof err);
    if (root) json_free(root);
    else FZ_CHECK(err[0] != '\0', "json_parse failed without a message");

    apex_profile *p = calloc(1, sizeof *p), *q = calloc(1, sizeof *q);
    sched_status s = apex_profile_parse((const char *)data, size, p);
    FZ_CHECK(s == SCHED_OK || sched_last_error()[0] != '\0', "profile rejected without a message");
    if (s == SCHED_OK) {
        FZ_CHECK(apex_profile_validate(p) == SCHED_OK, "a parsed profile fails validation");
        char *t1 = NULL, *t2 = NULL;
        FZ_CHECK(apex_profile_write(p, &t1) == SCHED_OK, "write of a parsed profile");
        FZ_CHECK(apex_profile_parse(t1, strlen(t1), q) == SCHED_OK, "written profile does not parse");
        FZ_CHECK(apex_profile_write(q, &t2) == SCHED_OK, "second write");
        FZ_CHECK(!strcmp(t1, t2), "round trip changed the profile:\n%s\n---\n%s", t1, t2);
        free(t1);
        free(t2);
    }
    free(p);
    free(q);
    return 0;
}
