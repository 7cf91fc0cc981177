/*
 * json.h - a small JSON reader (DOM, one allocation per node) and a writer
 * (growing buffer), enough for APEX's profile files. No dependencies.
 */
#ifndef APEX_SCHED_JSON_H
#define APEX_SCHED_JSON_H

#include <stddef.h>

typedef enum jtype { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } jtype;

typedef struct jnode {
    jtype type;
    double num;           /* J_NUM, J_BOOL (0/1)                 */
    char *str;            /* J_STR value                         */
    char *key;            /* member name when inside an object   */
    struct jnode *child;  /* first element / member              */
    struct jnode *next;   /* next sibling                        */
    int n;                /* elements / members                  */
} jnode;

/* Parses text[0..len). Returns the root, or NULL with a message in err
 * ("line 3: expected ':'"). */
jnode *json_parse(const char *text, size_t len, char *err, size_t errn);
void json_free(jnode *n);
const jnode *json_get(const jnode *obj, const char *key); /* NULL if absent */

typedef struct jbuf {
    char *p;
    size_t len, cap;
    int oom;
} jbuf;
void jb_puts(jbuf *b, const char *s);
void jb_printf(jbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void jb_str(jbuf *b, const char *s);   /* quoted, escaped */
void jb_num(jbuf *b, double v);        /* round-trips a double */

#endif
