/*
 * pcigate._cmask: the hot path of pcigate.masking in C, for runs of DataRow messages.
 *
 * It does exactly what pcigate.masking.Masker.mask_datarow does for the common cases, and hands every other
 * case back to that Python code (which stays the reference; tests/unit/test_cmask.py checks the two agree
 * byte for byte with Hypothesis):
 *
 *   - a field scanned for PANs (op PAN) whose digits are never joined by a single space or dash: every
 *     maximal run of 13-19 ASCII digits that passes Luhn gets '*' over all but the first `head` and last
 *     `tail` digits (Masker._mask_value's separator-free branch);
 *   - a redacted field (ops REDACT_*): '*' over the value, keeping JSON quotes (Masker.redact_value);
 *   - every other field is left alone.
 *
 * A field the fast path cannot decide alone -- digit groups joined by separators that add up to 13+
 * digits, or track data (a '^' or '=' next to a 13+ digit run) when the policy masks tracks -- stops the
 * walk *before* its row, and so does anything malformed (a short body, a field count that differs from the
 * plan, a bad field length): the caller runs the Python code on that one row, which masks it or raises.
 * Masking keeps every length, so no frame is rewritten.
 *
 * mask_copydata(buf, pos, head, tail, track) -> (bytearray | None, stop)
 *   the same for a run of CopyData messages of a text/CSV COPY OUT, each payload scanned whole as
 *   Masker.mask_copy_data does; a payload that needs Python stops the walk before it.
 *
 * mask_datarows(buf, pos, ops, head, tail, track) -> (bytearray | None, stop)
 *   buf:  bytes-like holding whole protocol messages from offset pos (a partial one may follow);
 *   ops:  one byte per column: 0 skip, 1 PAN scan, 2 redact text, 3 redact JSON text, 4 redact jsonb binary;
 *   returns the masked copy of buf[pos:stop] (None when nothing changed) and stop, the offset of the first
 *   message not handled: not a DataRow, incomplete, or a row for the Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MIN_PAN 13
#define MAX_PAN 19
#define MAX_MESSAGE (1u << 30) /* pcigate.wire.pg.MAX_MESSAGE */

enum { OP_SKIP = 0, OP_PAN = 1, OP_REDACT_TEXT = 2, OP_REDACT_JSON = 3, OP_REDACT_JSONB = 4 };
enum { V_NONE = 0, V_MASK = 1, V_SLOW = 2 };

static inline int is_digit(uint8_t c) { return c >= '0' && c <= '9'; }
static inline int is_sep(uint8_t c) { return c == ' ' || c == '-'; }

static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static int luhn_ok(const uint8_t *d, Py_ssize_t n) {
    int total = 0, dbl = 0;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        int x = d[i] - '0';
        if (dbl) {
            x *= 2;
            if (x > 9) x -= 9;
        }
        total += x;
        dbl = !dbl;
    }
    return total % 10 == 0;
}

/* What the PAN scan of one value needs: nothing, the contiguous-run mask, or the Python path. */
static int classify_value(const uint8_t *v, Py_ssize_t n, int track) {
    int joined = 0;      /* a digit, one separator, a digit ("0-0" in Masker's class string) */
    int long_run = 0;    /* a maximal digit run of 13+ */
    int seg_long = 0;    /* 13+ digits in a stretch of only digits and separators */
    int has_track = 0;   /* '^' or '=' anywhere */
    Py_ssize_t run = 0, seg = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t c = v[i];
        if (is_digit(c)) {
            if (++run >= MIN_PAN) long_run = 1;
            if (++seg >= MIN_PAN) seg_long = 1;
            continue;
        }
        run = 0;
        if (is_sep(c)) {
            if (i > 0 && i + 1 < n && is_digit(v[i - 1]) && is_digit(v[i + 1])) joined = 1;
            continue;
        }
        seg = 0;
        if (c == '^' || c == '=') has_track = 1;
    }
    if (joined) return seg_long ? V_SLOW : V_NONE;
    if (!long_run) return V_NONE;
    if (track && has_track) return V_SLOW;
    return V_MASK;
}

/* Mask every maximal digit run of 13-19 that passes Luhn (read from src, written to dst). */
static int mask_runs(const uint8_t *src, uint8_t *dst, Py_ssize_t n, int head, int tail) {
    int changed = 0;
    Py_ssize_t i = 0;
    while (i < n) {
        if (!is_digit(src[i])) {
            i++;
            continue;
        }
        Py_ssize_t j = i;
        while (j < n && is_digit(src[j])) j++;
        Py_ssize_t len = j - i;
        if (len >= MIN_PAN && len <= MAX_PAN && luhn_ok(src + i, len)) {
            if (dst != NULL && len > head + tail) memset(dst + i + head, '*', (size_t)(len - head - tail));
            changed = 1;
        }
        i = j;
    }
    return changed;
}

static void redact(uint8_t *dst, Py_ssize_t n, int op) {
    if (op == OP_REDACT_JSON && n >= 2) {
        dst[0] = '"';
        memset(dst + 1, '*', (size_t)(n - 2));
        dst[n - 1] = '"';
    } else if (op == OP_REDACT_JSONB && n >= 3) {
        dst[0] = 1;
        dst[1] = '"';
        memset(dst + 2, '*', (size_t)(n - 3));
        dst[n - 1] = '"';
    } else {
        memset(dst, '*', (size_t)n);
    }
}

/* Does redacting change this value? (Masker adds an edit only when the value differs.) */
static int redact_changes(const uint8_t *v, Py_ssize_t n, int op) {
    Py_ssize_t lo = 0, hi = n;
    if (op == OP_REDACT_JSON && n >= 2) {
        if (v[0] != '"' || v[n - 1] != '"') return 1;
        lo = 1, hi = n - 1;
    } else if (op == OP_REDACT_JSONB && n >= 3) {
        if (v[0] != 1 || v[1] != '"' || v[n - 1] != '"') return 1;
        lo = 2, hi = n - 1;
    }
    for (Py_ssize_t i = lo; i < hi; i++)
        if (v[i] != '*') return 1;
    return 0;
}

/* The copy of src[start:end] written into at the first change; returns dst indexed like src, or NULL. */
static uint8_t *copy_out(const uint8_t *src, Py_ssize_t start, Py_ssize_t end, PyObject **out) {
    *out = PyByteArray_FromStringAndSize((const char *)src + start, end - start);
    if (*out == NULL) return NULL;
    return (uint8_t *)PyByteArray_AS_STRING(*out) - start;
}

/* (the copy cut to src[start:stop] or None when nothing changed, stop) */
static PyObject *walk_result(PyObject *out, Py_ssize_t start, Py_ssize_t stop) {
    if (out == NULL) return Py_BuildValue("(On)", Py_None, stop);
    if (PyByteArray_Resize(out, stop - start) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return Py_BuildValue("(Nn)", out, stop);
}

static PyObject *mask_datarows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf, ops;
    Py_ssize_t pos;
    int head, tail, track;
    if (!PyArg_ParseTuple(args, "y*ny*iip", &buf, &pos, &ops, &head, &tail, &track)) return NULL;
    const uint8_t *src = (const uint8_t *)buf.buf;
    const uint8_t *op = (const uint8_t *)ops.buf;
    Py_ssize_t end = buf.len, nops = ops.len, start = pos;
    uint8_t *dst = NULL; /* the copy of src[start:end], made at the first change */
    PyObject *out = NULL;

    if (pos < 0 || pos > end || head < 0 || tail < 0) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&ops);
        PyErr_SetString(PyExc_ValueError, "bad arguments");
        return NULL;
    }
    while (pos + 5 <= end && src[pos] == 'D') {
        uint32_t mlen = be32(src + pos + 1);
        if (mlen < 4 || mlen > MAX_MESSAGE || (Py_ssize_t)mlen > end - pos - 1) break;
        Py_ssize_t body = pos + 5, next = pos + 1 + (Py_ssize_t)mlen;
        if (next - body < 2) break;
        int16_t count = (int16_t)((src[body] << 8) | src[body + 1]);
        if (count != nops) break;
        /* first pass: decide; a row that needs Python stops the walk before it */
        int slow = 0, work = 0;
        Py_ssize_t p = body + 2;
        for (Py_ssize_t f = 0; f < nops; f++) {
            if (p + 4 > next) { slow = 1; break; }
            int32_t flen = (int32_t)be32(src + p);
            p += 4;
            if (flen < 0) {
                if (flen != -1) { slow = 1; break; }
                continue;
            }
            if (flen > next - p) { slow = 1; break; }
            if (op[f] == OP_PAN) {
                if (flen >= MIN_PAN) {
                    int c = classify_value(src + p, flen, track);
                    if (c == V_SLOW) { slow = 1; break; }
                    if (c == V_MASK) work = 1;
                }
            } else if (op[f] != OP_SKIP) {
                if (redact_changes(src + p, flen, op[f])) work = 1;
            }
            p += flen;
        }
        if (slow || p != next) break;
        if (work) {
            if (dst == NULL && (dst = copy_out(src, start, end, &out)) == NULL) goto fail;
            p = body + 2;
            for (Py_ssize_t f = 0; f < nops; f++) {
                int32_t flen = (int32_t)be32(src + p);
                p += 4;
                if (flen < 0) continue;
                if (op[f] == OP_PAN) {
                    if (flen >= MIN_PAN && classify_value(src + p, flen, track) == V_MASK)
                        mask_runs(src + p, dst + p, flen, head, tail);
                } else if (op[f] != OP_SKIP) {
                    if (redact_changes(src + p, flen, op[f])) redact(dst + p, flen, op[f]);
                }
                p += flen;
            }
        }
        pos = next;
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&ops);
    return walk_result(out, start, pos);
fail:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&ops);
    return NULL;
}

static PyObject *mask_copydata(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    Py_ssize_t pos;
    int head, tail, track;
    if (!PyArg_ParseTuple(args, "y*niip", &buf, &pos, &head, &tail, &track)) return NULL;
    const uint8_t *src = (const uint8_t *)buf.buf;
    Py_ssize_t end = buf.len, start = pos;
    uint8_t *dst = NULL;
    PyObject *out = NULL;
    if (pos < 0 || pos > end || head < 0 || tail < 0) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "bad arguments");
        return NULL;
    }
    while (pos + 5 <= end && src[pos] == 'd') {
        uint32_t mlen = be32(src + pos + 1);
        if (mlen < 4 || mlen > MAX_MESSAGE || (Py_ssize_t)mlen > end - pos - 1) break;
        Py_ssize_t body = pos + 5, n = (Py_ssize_t)mlen - 4;
        if (n >= MIN_PAN) {
            int c = classify_value(src + body, n, track);
            if (c == V_SLOW) break;
            if (c == V_MASK) {
                if (dst == NULL && (dst = copy_out(src, start, end, &out)) == NULL) {
                    PyBuffer_Release(&buf);
                    return NULL;
                }
                mask_runs(src + body, dst + body, n, head, tail);
            }
        }
        pos = body + n;
    }
    PyBuffer_Release(&buf);
    return walk_result(out, start, pos);
}

static PyMethodDef methods[] = {
    {"mask_copydata", mask_copydata, METH_VARARGS,
     "mask_copydata(buf, pos, head, tail, track) -> (bytearray | None, stop)"},
    {"mask_datarows", mask_datarows, METH_VARARGS,
     "mask_datarows(buf, pos, ops, head, tail, track) -> (bytearray | None, stop)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cmask", "pcigate's masking hot path in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cmask(void) { return PyModule_Create(&module); }
