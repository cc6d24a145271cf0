/*
 * pcigate._crec: the lines of a database recording's `stmt` events, encoded and hash-chained in C, in the
 * recording's writer thread, with the GIL released.
 *
 * Why: at pgbench rates, encoding and chaining each statement on the tunnel's event loop cost the loop
 * ~13 us per statement (docs/performance.md), on the one thread every connection of the session waits for.
 * With this module the loop only queues the statement's values (a tuple); the writer thread turns a batch of
 * them into lines here, off the loop and mostly outside the GIL.
 *
 * The bytes are exactly those of the Python encoder (pcigate.recording._stmt_parts and the chain), which
 * stays the reference: tests/unit/test_crec.py checks the two agree byte for byte with Hypothesis.
 *
 * chain_stmts(prev_h, items, start, t0=0.0, last_t=0.0) -> (lines: bytes, h: str, stop: int, last_t: float)
 *
 *   items[start:] are queued events; those that are plain stmt tuples, either
 *       (t, c, sql, truncated, proto, params, ms, rows, tag, sqlstate, error)            ("cooked") or
 *       (end, begin, c, sql, truncated, proto, params, rows, tag, sqlstate, error)       ("raw": [1] a float)
 *   where a raw one's end and begin are clock readings (perf_counter) and t0 the recording's start on that
 *   clock: t = floor((end - t0) * 1e6 + 0.5) / 1e6, ms = floor((end - begin) * 1000 * 1e3 + 0.5) / 1e3,
 *   computed and formatted here without Python's float machinery (pcigate.recording._q is the reference);
 *   every t is then raised to last_t (the previous event's) if it is smaller, so that t never goes backwards
 *   in the file; are encoded one after the other, each line chained to the previous h (prev_h first):
 *       canon = the canonical JSON of the event without "h" (keys sorted, no spaces, strings escaped as
 *               json.encoder.encode_basestring does, UTF-8, floats as float.__repr__);
 *       h     = hex SHA-256 of the previous h (ASCII) followed by canon;
 *       line  = canon with "h":"<h>", inserted after the "error" member, and a newline.
 *   It stops at the end, or before the first item it does not handle (not an exact 11-tuple; c, params or
 *   rows not an exact int that fits in 64 bits; truncated not a bool; t or ms not a finite float; a string
 *   that is not valid UTF-8): `stop` is that item's index, `h` the chain after the last line encoded,
 *   `last_t` the t of that line (or the last_t given).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define HEX_LEN (2 * SHA256_DIGEST_LENGTH)
#define FLOAT_LEN 40 /* longest float.__repr__ is 24 characters */

/* ---- the values of one statement, read while holding the GIL ---------------------------------------- */

typedef struct {
    const char *p; /* NULL: JSON null */
    Py_ssize_t n;
} Str;

typedef struct {
    long long c, params, rows;
    int params_null, rows_null, truncated;
    Str sql, proto, tag, sqlstate, error;
    char t[FLOAT_LEN], ms[FLOAT_LEN]; /* float.__repr__, made while holding the GIL, unless: */
    int t_units, ms_units;            /* 1: t (ms) is t_k / 10**6 (ms_k / 10**3), formatted without the GIL */
    double t_k, ms_k;
} Stmt;

/* 0 ok, 1 not plain */
static int get_str(PyObject *o, int nullable, Str *out) {
    if (o == Py_None && nullable) {
        out->p = NULL;
        out->n = 0;
        return 0;
    }
    if (!PyUnicode_CheckExact(o)) return 1;
    out->p = PyUnicode_AsUTF8AndSize(o, &out->n); /* cached in the str; chain_stmts holds its tuple */
    if (out->p == NULL) {
        PyErr_Clear(); /* a lone surrogate: the Python encoder decides what happens */
        return 1;
    }
    return 0;
}

static int get_int(PyObject *o, int nullable, long long *v, int *is_null) {
    if (o == Py_None && nullable) {
        *is_null = 1;
        return 0;
    }
    if (!PyLong_CheckExact(o)) return 1; /* a bool is not a plain int here */
    int overflow = 0;
    *v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (*v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 1;
    }
    if (is_null) *is_null = 0;
    return 0;
}

/* 0 ok, 1 not plain (not an exact float, or not finite) */
static int get_double(PyObject *o, double *v) {
    if (!PyFloat_CheckExact(o)) return 1;
    *v = PyFloat_AS_DOUBLE(o);
    return isfinite(*v) ? 0 : 1;
}

/* A raw statement's t and ms: k = floor(x * scale + 0.5), the value k / scale (pcigate.recording._q does
 * the same arithmetic in Python, so the two agree to the bit; the build turns off FMA contraction for it).
 * 0 ok, 1 not plain: not finite, or |k| > 1e15 (beyond that a double's spacing nears the last decimal and
 * fmt_units would no longer give float.__repr__). */
static int q_units(double x, double scale, double *k) {
    double y = x * scale;
    y = y + 0.5;
    *k = floor(y);
    return fabs(*k) <= 1e15 ? 0 : 1; /* false for NaN too */
}

/* float.__repr__ of k / 10**d, for an integral k with |k| <= 1e15 and d 3 or 6, without the GIL: the
 * double nearest a decimal with at most d decimals (and at most ~16 digits) has that decimal, without
 * trailing zeros, as its shortest round-trip form; repr writes values under 1e-4 in exponent form. */
static void fmt_units(double kd, int d, char *out) {
    char *p = out;
    unsigned long long k;
    if (kd < 0) {
        *p++ = '-';
        k = (unsigned long long)(-kd);
    }
    else
        k = (unsigned long long)kd;
    if (k == 0) {
        strcpy(out, "0.0"); /* kd is 0.0 (floor never gives -0.0 here: y >= 0.5 or y < 0) */
        return;
    }
    if (d == 6 && k < 100) { /* below 1e-4: 5e-06, 1e-05, 1.2e-05 */
        if (k < 10)
            sprintf(p, "%llue-06", k);
        else if (k % 10 == 0)
            sprintf(p, "%llue-05", k / 10);
        else
            sprintf(p, "%llu.%llue-05", k / 10, k % 10);
        return;
    }
    unsigned long long pw = d == 6 ? 1000000ULL : 1000ULL;
    p += sprintf(p, "%llu.", k / pw);
    unsigned long long fp = k % pw;
    if (fp == 0) {
        strcpy(p, "0");
        return;
    }
    int n = sprintf(p, "%0*llu", d, fp);
    while (n > 1 && p[n - 1] == '0') p[--n] = '\0';
}

/* float.__repr__ of v into out. -1 error (exception set), 0 ok, 1 not plain */
static int repr_double(double v, char *out) {
    char *s = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (s == NULL) return -1;
    size_t n = strlen(s);
    if (n >= FLOAT_LEN) {
        PyMem_Free(s);
        return 1;
    }
    memcpy(out, s, n + 1);
    PyMem_Free(s);
    return 0;
}

/* one queued item's values into s; *last_t: the previous event's t, advanced to this one's when it is
 * plain (and left alone when it is not). -1 error (exception set), 0 ok, 1 not plain */
static int get_stmt(PyObject *item, Stmt *s, double t0, double *last_t) {
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 11) return 1;
    PyObject **v = &PyTuple_GET_ITEM(item, 0);
    int raw = PyFloat_CheckExact(v[1]);
    PyObject **f = raw ? v + 1 : v; /* raw: c, sql, ... sit one place further, up to params; no ms */
    double t, ms = 0.0;
    int r;
    if (get_double(v[0], &t)) return 1;
    if (raw) {
        double begin;
        if (get_double(v[1], &begin) || q_units(t - t0, 1e6, &s->t_k)
            || q_units((t - begin) * 1000.0, 1e3, &s->ms_k))
            return 1;
        t = s->t_k / 1e6;
    }
    else if (get_double(v[6], &ms))
        return 1;
    if (get_int(f[1], 0, &s->c, NULL) || get_str(f[2], 0, &s->sql)) return 1;
    if (f[3] != Py_True && f[3] != Py_False) return 1;
    s->truncated = f[3] == Py_True;
    if (get_str(f[4], 0, &s->proto) || get_int(f[5], 1, &s->params, &s->params_null)) return 1;
    if (get_int(v[7], 1, &s->rows, &s->rows_null) || get_str(v[8], 1, &s->tag)
        || get_str(v[9], 1, &s->sqlstate) || get_str(v[10], 1, &s->error))
        return 1;
    s->t_units = raw && !(t < *last_t);
    s->ms_units = raw;
    if (t < *last_t) t = *last_t;
    if (!s->t_units && (r = repr_double(t, s->t)) != 0) return r;
    if (!raw && (r = repr_double(ms, s->ms)) != 0) return r;
    *last_t = t;
    return 0;
}

/* ---- encoding and chaining, without the GIL (no Python API below this line until chain_stmts) --------- */

typedef struct {
    char *p;
    size_t len, cap;
} Buf;

static int reserve(Buf *b, size_t more) {
    if (more > SIZE_MAX - b->len) return -1;
    size_t need = b->len + more;
    if (need <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    char *p = PyMem_RawRealloc(b->p, cap);
    if (p == NULL) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int put(Buf *b, const char *s, size_t n) {
    if (reserve(b, n) < 0) return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

#define PUT_LIT(b, lit) put((b), (lit), sizeof(lit) - 1)

/* a JSON string as json.encoder.encode_basestring writes it (UTF-8 in, UTF-8 out), or null */
static int put_str(Buf *b, Str s) {
    if (s.p == NULL) return PUT_LIT(b, "null");
    if ((size_t)s.n > (SIZE_MAX - 2) / 6 || reserve(b, (size_t)s.n * 6 + 2) < 0) return -1;
    static const char hex[] = "0123456789abcdef";
    char *d = b->p + b->len;
    *d++ = '"';
    for (Py_ssize_t i = 0; i < s.n; i++) {
        unsigned char ch = (unsigned char)s.p[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            *d++ = (char)ch;
            continue;
        }
        *d++ = '\\';
        switch (ch) {
        case '"': *d++ = '"'; break;
        case '\\': *d++ = '\\'; break;
        case '\n': *d++ = 'n'; break;
        case '\r': *d++ = 'r'; break;
        case '\t': *d++ = 't'; break;
        case '\b': *d++ = 'b'; break;
        case '\f': *d++ = 'f'; break;
        default:
            *d++ = 'u';
            *d++ = '0';
            *d++ = '0';
            *d++ = hex[ch >> 4];
            *d++ = hex[ch & 15];
        }
    }
    *d++ = '"';
    b->len = (size_t)(d - b->p);
    return 0;
}

static int put_int(Buf *b, long long v, int is_null) {
    if (is_null) return PUT_LIT(b, "null");
    char tmp[24];
    int k = snprintf(tmp, sizeof tmp, "%lld", v);
    return put(b, tmp, (size_t)k);
}

static int put_cstr(Buf *b, const char *s) { return put(b, s, strlen(s)); }

/* canon (into `canon`, after the previous h already there) and `split`, where "h" goes */
static int encode(Buf *canon, const Stmt *s, const char *t, const char *ms, size_t *split) {
    if (PUT_LIT(canon, "{\"blocked\":null,\"c\":") || put_int(canon, s->c, 0)
        || PUT_LIT(canon, ",\"e\":\"stmt\",\"error\":") || put_str(canon, s->error) || PUT_LIT(canon, ","))
        return -1;
    *split = canon->len;
    if (PUT_LIT(canon, "\"ms\":") || put_cstr(canon, ms) || PUT_LIT(canon, ",\"params\":")
        || put_int(canon, s->params, s->params_null) || PUT_LIT(canon, ",\"proto\":")
        || put_str(canon, s->proto) || PUT_LIT(canon, ",\"rows\":") || put_int(canon, s->rows, s->rows_null)
        || PUT_LIT(canon, ",\"sql\":") || put_str(canon, s->sql) || PUT_LIT(canon, ","))
        return -1;
    if (s->truncated && PUT_LIT(canon, "\"sql_truncated\":true,")) return -1;
    if (PUT_LIT(canon, "\"sqlstate\":") || put_str(canon, s->sqlstate) || PUT_LIT(canon, ",\"t\":")
        || put_cstr(canon, t) || PUT_LIT(canon, ",\"tag\":") || put_str(canon, s->tag) || PUT_LIT(canon, "}"))
        return -1;
    return 0;
}

/* every statement's line into `out`; `h` (HEX_LEN chars) is the previous h on entry, the last on exit */
static int chain_all(const Stmt *stmts, Py_ssize_t n, char *h, Buf *out) {
    static const char hex[] = "0123456789abcdef";
    Buf canon = {NULL, 0, 0};
    int rc = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        canon.len = 0;
        size_t split;
        const Stmt *st = &stmts[i];
        char t[FLOAT_LEN], ms[FLOAT_LEN];
        if (st->t_units)
            fmt_units(st->t_k, 6, t);
        if (st->ms_units)
            fmt_units(st->ms_k, 3, ms);
        if (put(&canon, h, HEX_LEN) < 0
            || encode(&canon, st, st->t_units ? t : st->t, st->ms_units ? ms : st->ms, &split) < 0) {
            rc = -1;
            break;
        }
        unsigned char md[SHA256_DIGEST_LENGTH];
        SHA256((const unsigned char *)canon.p, canon.len, md);
        for (int k = 0; k < SHA256_DIGEST_LENGTH; k++) {
            h[2 * k] = hex[md[k] >> 4];
            h[2 * k + 1] = hex[md[k] & 15];
        }
        if (put(out, canon.p + HEX_LEN, split - HEX_LEN) < 0 || PUT_LIT(out, "\"h\":\"")
            || put(out, h, HEX_LEN) < 0 || PUT_LIT(out, "\",")
            || put(out, canon.p + split, canon.len - split) < 0 || PUT_LIT(out, "\n")) {
            rc = -1;
            break;
        }
    }
    PyMem_RawFree(canon.p);
    return rc;
}

/* ---- the Python function ------------------------------------------------------------------------------ */

static PyObject *chain_stmts(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *prev, *items;
    Py_ssize_t start;
    double t0 = 0.0, last_t = 0.0;
    if (!PyArg_ParseTuple(args, "UO!n|dd:chain_stmts", &prev, &PyList_Type, &items, &start, &t0, &last_t))
        return NULL;
    if (!isfinite(t0) || !isfinite(last_t)) {
        PyErr_SetString(PyExc_ValueError, "t0 and last_t must be finite");
        return NULL;
    }
    Py_ssize_t prev_n;
    const char *prev_s = PyUnicode_AsUTF8AndSize(prev, &prev_n);
    if (prev_s == NULL) return NULL;
    if (prev_n != HEX_LEN) {
        PyErr_SetString(PyExc_ValueError, "prev_h must be 64 hex digits");
        return NULL;
    }
    Py_ssize_t total = PyList_GET_SIZE(items);
    if (start < 0 || start > total) {
        PyErr_SetString(PyExc_IndexError, "start out of range");
        return NULL;
    }
    /* Read the run's values while holding the GIL, and a reference to each item as it is read: the strings
     * whose UTF-8 the GIL-free phase reads live as long as their tuples, whatever happens to `items`. */
    Py_ssize_t cap = 0, n = 0;
    Stmt *stmts = NULL;
    PyObject **held = NULL;
    int err = 0;
    while (start + n < total) {
        if (n == cap) {
            Py_ssize_t ncap = cap ? cap * 2 : 64;
            Stmt *s2 = PyMem_RawRealloc(stmts, sizeof(Stmt) * (size_t)ncap);
            if (s2 == NULL) {
                err = 1;
                break;
            }
            stmts = s2;
            PyObject **h2 = PyMem_RawRealloc(held, sizeof(PyObject *) * (size_t)ncap);
            if (h2 == NULL) {
                err = 1;
                break;
            }
            held = h2;
            cap = ncap;
        }
        PyObject *item = PyList_GET_ITEM(items, start + n);
        int r = get_stmt(item, &stmts[n], t0, &last_t);
        if (r < 0) {
            err = 2;
            break;
        }
        if (r > 0) break;
        Py_INCREF(item);
        held[n++] = item;
    }
    char h[HEX_LEN];
    memcpy(h, prev_s, HEX_LEN);
    Buf out = {NULL, 0, 0};
    int rc = 0;
    if (n > 0 && !err) {
        Py_BEGIN_ALLOW_THREADS
        rc = chain_all(stmts, n, h, &out);
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t k = 0; k < n; k++) Py_DECREF(held[k]);
    PyMem_RawFree(held);
    PyMem_RawFree(stmts);
    if (err == 2) return NULL; /* the exception get_stmt set */
    if (err || rc < 0) {
        PyMem_RawFree(out.p);
        return PyErr_NoMemory();
    }
    PyObject *lines = PyBytes_FromStringAndSize(out.p ? out.p : "", (Py_ssize_t)out.len);
    PyMem_RawFree(out.p);
    if (lines == NULL) return NULL;
    return Py_BuildValue("(Ns#nd)", lines, h, (Py_ssize_t)HEX_LEN, start + n, last_t);
}

static PyMethodDef methods[] = {
    {"chain_stmts", chain_stmts, METH_VARARGS, "chain_stmts(prev_h, items, start, t0=0.0, last_t=0.0) -> (lines, h, stop, last_t)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_crec", "pcigate's recording hot path in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__crec(void) { return PyModule_Create(&module); }
