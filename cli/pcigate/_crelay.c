/*
 * pcigate._crelay: the byte relay of the PostgreSQL tunnel's plain connections (no guardrails, no masking,
 * no TLS upstream), in its own thread with the GIL released.
 *
 * Why: a Python relay serves every connection of a session from the one event-loop thread, at ~10 us of
 * interpreter per round trip on top of the kernel's ~15 us; pgbench through it reached 0.73-0.85x socat
 * (docs/performance.md). A C epoll loop relays at socat's speed or better. Python keeps the meaning: the
 * tunnel's recording logic (pcigate.tunnel.pg) reads the same messages as before, handed over in batches.
 *
 * Relay(message_cls, client_allowed, client_wanted, client_keep, server_allowed, server_wanted, server_keep,
 *       max_len)
 *   starts the relay thread. *_allowed / *_wanted are bytes of message types, exactly as
 *   pcigate.wire.pg.MessageScanner takes them: a type not allowed, or a length outside 4..max_len, is a
 *   protocol error; wanted messages are handed out with their body (the first *_keep bytes of it).
 *
 * add(client_fd, server_fd, from_client, from_server) -> id
 *   takes over two connected non-blocking sockets (the relay closes them) and bytes already read from each
 *   (server's first). From then on, what one side sends is framed and, unless malformed, written to the other.
 *
 * drain() -> list of (id, kind, t, payload), in the order things happened:
 *   kind 0 / 1: messages the client / the server sent, payload a list of message_cls(type, body, length,
 *               truncated, mark) (mark: that direction's CopyData payload bytes before the message), t the
 *               time the bytes were read (CLOCK_MONOTONIC, what time.perf_counter() reads on Linux);
 *   kind 2:     that connection stopped: payload (side, reason), side 0 client / 1 server, reason "" for
 *               an orderly end (EOF) or the error's text;
 *   kind 3:     malformed bytes: payload (side, message); the chunk that held them was not forwarded and
 *               the connection is stopped.
 *   A stopped connection relays nothing more; its sockets stay open until close().
 * fileno() -> an eventfd that becomes readable when drain() has something (drain() resets it).
 * close(id, to_client, to_server) -> (bytes_up, bytes_down): the relay writes what is left to write, then
 *   the given bytes, then closes both sockets; a side that does not read gets CLOSE_GRACE_S (2 s) for it,
 *   in the relay thread (close() itself does not wait).
 * shutdown(): stops the thread and closes every socket still open (also done when the object goes away).
 *
 * A side that hangs up (or resets) while its last read is still being written to the other is read to its
 * end once that write is done: nothing it sent before its end is lost (e.g. the server's FATAL error).
 *
 * Bounds: one 64 KiB read at a time per direction, read only when the previous one is fully written (the
 * slower side paces the faster, as in the Python relay); message bodies waiting for drain() above 16 MiB
 * make the thread wait for it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_SIZE 65536
#define QUEUE_HIGH (16u << 20)
#define NOTIFY_BYTES (256u << 10) /* queued bytes that wake Python at once */
#define NOTIFY_DELAY_MS 5         /* otherwise messages wait at most this long for a wake-up */
#define ERR_LEN 160
#define CLOSE_GRACE_S 2.0 /* close(): how long the last bytes may take to leave */
#define NOT_REGISTERED UINT32_MAX

typedef struct ev {
    struct ev *next;
    uint64_t id;
    double t;
    uint64_t length, mark;
    size_t blen;
    uint8_t kind, type, truncated, side;
    char body[];
} ev_t;

typedef struct {
    ev_t *head, *tail;
    size_t bytes;
} evlist_t;

typedef struct {
    const uint8_t *kind; /* 0 not allowed, 1 walk over, 2 hand out */
    uint32_t keep;
    uint8_t hdr[5];
    int hlen;
    uint64_t skip;
    int btype;
    uint8_t *body;
    size_t kept, cap;
    uint64_t blen, bneed, bmark;
    uint64_t copy_bytes;
} scan_t;

typedef struct {
    scan_t sc;
    uint8_t *out; /* read from this direction's source, not yet written to its destination */
    size_t out_len, out_off;
    uint64_t total;
} dir_t;

/* A connection is running (relaying), stopped (by an end, an error or malformed bytes: out of the epoll set,
 * waiting for close()), or closing (close() was called and the last bytes are still leaving, for at most
 * CLOSE_GRACE_S; Python has forgotten it). A running connection's source that hung up while its last read
 * was still being written is draining: out of the epoll set (EPOLLHUP cannot be masked), read again once
 * that write is done, until its end. */
typedef struct {
    uint64_t id;
    uint32_t gen;
    int running, closing;
    int draining[2];
    double deadline;
    int fd[2];        /* 0 client, 1 server */
    uint32_t want[2]; /* epoll interest registered per fd (NOT_REGISTERED: none) */
    dir_t dir[2];     /* 0 client -> server, 1 server -> client */
    ev_t *stop_ev;    /* allocated with the connection: its stop is reported even out of memory */
} conn_t;

typedef struct {
    PyObject_HEAD
    PyObject *message_cls;
    uint8_t kind[2][256];
    uint32_t keep[2];
    uint64_t max_len;
    pthread_mutex_t mu;
    pthread_cond_t drained;
    pthread_t thread;
    int initialised, thread_started, stopping;
    int ep, efd, stopfd;
    int nclosing;
    int notified;
    double first_unnotified; /* when the oldest event not yet signalled was queued (0: none) */
    evlist_t q;
    conn_t **conns;
    size_t nconns;
    uint64_t next_id;
    uint8_t buf[READ_SIZE];
} Relay;

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static ev_t *ev_new(uint64_t id, uint8_t kind, double t, const void *body, size_t blen) {
    ev_t *e = malloc(sizeof(ev_t) + blen + 1);
    if (e == NULL)
        return NULL;
    memset(e, 0, sizeof(ev_t));
    e->id = id;
    e->kind = kind;
    e->t = t;
    e->blen = blen;
    if (body != NULL && blen)
        memcpy(e->body, body, blen);
    e->body[blen] = 0;
    return e;
}

static void list_push(evlist_t *l, ev_t *e) {
    e->next = NULL;
    if (l->tail)
        l->tail->next = e;
    else
        l->head = e;
    l->tail = e;
    l->bytes += e->blen + sizeof(ev_t);
}

static void list_free(evlist_t *l) {
    ev_t *e = l->head;
    while (e) {
        ev_t *n = e->next;
        free(e);
        e = n;
    }
    l->head = l->tail = NULL;
    l->bytes = 0;
}

/* caller holds mu */
static void notify(Relay *R) {
    if (!R->notified) {
        uint64_t one = 1;
        R->notified = 1;
        ssize_t w = write(R->efd, &one, sizeof one);
        (void)w;
    }
    R->first_unnotified = 0;
}

/* caller holds mu. Messages are signalled in batches (NOTIFY_BYTES, NOTIFY_DELAY_MS, see relay_main): a
 * wake-up of the event loop per round trip cost more than the relay itself. Stops are signalled at once. */
static void queue_splice(Relay *R, evlist_t *l, int urgent) {
    if (!l->head)
        return;
    if (R->q.tail)
        R->q.tail->next = l->head;
    else
        R->q.head = l->head;
    R->q.tail = l->tail;
    R->q.bytes += l->bytes;
    l->head = l->tail = NULL;
    l->bytes = 0;
    if (urgent || R->q.bytes >= NOTIFY_BYTES)
        notify(R);
    else if (!R->notified && R->first_unnotified == 0)
        R->first_unnotified = now_mono();
}

/* ---- framing: pcigate.wire.pg.MessageScanner, in C ------------------------------------------------- */

/* The client message bodies that the tunnel's parsers (pcigate.wire.pg: parse_parse, parse_bind,
 * parse_execute, parse_close) refuse, with their words: such a message fails the connection before anything
 * of its chunk is forwarded, as on the asyncio relay. Everything else in a body is the server's to judge. */
static const char *client_body_error(uint8_t type, const uint8_t *b, size_t n) {
    const uint8_t *z;
    size_t pos;
    if (n == 0) /* (the body buffer may not exist yet) */
        return type == 'C' ? "empty Close message"
               : (type == 'P' || type == 'E' || type == 'B') ? "unterminated string in message" : NULL;
    switch (type) {
    case 'P':
    case 'E':
        return memchr(b, 0, n) ? NULL : "unterminated string in message";
    case 'B':
        z = memchr(b, 0, n);
        if (z == NULL)
            return "unterminated string in message";
        pos = (size_t)(z - b) + 1;
        z = memchr(b + pos, 0, n - pos);
        if (z == NULL)
            return "unterminated string in message";
        pos = (size_t)(z - b) + 1;
        if (n >= pos + 2 && (b[pos] & 0x80))
            return "negative format count in Bind";
        return NULL;
    case 'C':
        return memchr(b + 1, 0, n - 1) ? NULL : "unterminated string in message";
    default:
        return NULL;
    }
}

static int emit(scan_t *s, evlist_t *out, uint64_t id, uint8_t side, double t, char *err) {
    if (side == 0) {
        const char *bad = client_body_error((uint8_t)s->btype, s->body, s->kept);
        if (bad != NULL) {
            snprintf(err, ERR_LEN, "%s", bad);
            return -1;
        }
    }
    ev_t *e = ev_new(id, side, t, s->body, s->kept);
    if (e == NULL) {
        snprintf(err, ERR_LEN, "out of memory");
        return -1;
    }
    e->type = (uint8_t)s->btype;
    e->length = s->blen;
    e->truncated = s->blen > s->keep;
    e->mark = s->bmark;
    list_push(out, e);
    return 0;
}

static int scan_start(scan_t *s, uint64_t max_len, uint8_t type, uint32_t len, evlist_t *out, uint64_t id,
                      uint8_t side, double t, char *err) {
    uint8_t k = s->kind[type];
    if (k == 0) {
        snprintf(err, ERR_LEN, "unexpected message type 0x%02x", type);
        return -1;
    }
    if (len < 4 || len > max_len) {
        snprintf(err, ERR_LEN, "invalid message length %u", len);
        return -1;
    }
    uint64_t blen = len - 4;
    if (k == 1) {
        if (type == 'd')
            s->copy_bytes += blen;
        s->skip = blen;
        return 0;
    }
    s->btype = type;
    s->blen = blen;
    s->bneed = blen;
    s->bmark = s->copy_bytes;
    s->kept = 0;
    size_t need = blen < s->keep ? (size_t)blen : s->keep;
    if (need > s->cap) { /* grows to the largest kept body seen, at most keep */
        uint8_t *nb = realloc(s->body, need);
        if (nb == NULL) {
            snprintf(err, ERR_LEN, "out of memory");
            return -1;
        }
        s->body = nb;
        s->cap = need;
    }
    if (blen == 0) {
        if (emit(s, out, id, side, t, err) < 0)
            return -1;
        s->btype = -1;
    }
    return 0;
}

/* Frame n bytes; wanted messages completed are appended to out. 0, or -1 with err set. */
static int scan_feed(scan_t *s, uint64_t max_len, const uint8_t *p, size_t n, evlist_t *out, uint64_t id,
                     uint8_t side, double t, char *err) {
    size_t pos = 0;
    while (pos < n) {
        if (s->skip) {
            uint64_t k = s->skip < n - pos ? s->skip : n - pos;
            s->skip -= k;
            pos += k;
            continue;
        }
        if (s->btype >= 0) {
            uint64_t take = s->bneed < n - pos ? s->bneed : n - pos;
            size_t room = s->keep - s->kept;
            size_t c = take < room ? take : room;
            memcpy(s->body + s->kept, p + pos, c);
            s->kept += c;
            s->bneed -= take;
            pos += take;
            if (s->bneed == 0) {
                if (emit(s, out, id, side, t, err) < 0)
                    return -1;
                s->btype = -1;
            }
            continue;
        }
        if (s->hlen || n - pos < 5) {
            size_t k = (size_t)(5 - s->hlen) < n - pos ? (size_t)(5 - s->hlen) : n - pos;
            memcpy(s->hdr + s->hlen, p + pos, k);
            s->hlen += (int)k;
            pos += k;
            if (s->hlen < 5)
                break;
            s->hlen = 0;
            if (scan_start(s, max_len, s->hdr[0], be32(s->hdr + 1), out, id, side, t, err) < 0)
                return -1;
            continue;
        }
        uint8_t type = p[pos];
        uint32_t len = be32(p + pos + 1);
        pos += 5;
        if (scan_start(s, max_len, type, len, out, id, side, t, err) < 0)
            return -1;
    }
    return 0;
}

/* ---- connections (caller holds mu) ------------------------------------------------------------------ */

static uint64_t ep_key(size_t slot, uint32_t gen, int fdi) {
    return ((uint64_t)gen << 32) | ((uint64_t)slot << 1) | (uint64_t)fdi;
}

static void set_fd(Relay *R, size_t slot, conn_t *c, int i, uint32_t want) {
    if (want == c->want[i])
        return;
    struct epoll_event ee;
    ee.events = want;
    ee.data.u64 = ep_key(slot, c->gen, i);
    if (want == NOT_REGISTERED)
        epoll_ctl(R->ep, EPOLL_CTL_DEL, c->fd[i], NULL);
    else
        epoll_ctl(R->ep, c->want[i] == NOT_REGISTERED ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, c->fd[i], &ee);
    c->want[i] = want;
}

static void set_interest(Relay *R, size_t slot, conn_t *c) {
    for (int i = 0; i < 2; i++) {
        uint32_t want;
        if (c->closing) /* only the last bytes to write */
            want = c->dir[1 - i].out_len ? EPOLLOUT : NOT_REGISTERED;
        else if (!c->running || c->draining[i])
            want = NOT_REGISTERED;
        else
            want = (c->dir[i].out_len == 0 ? EPOLLIN : 0u) /* fd i is the source of direction i */
                   | (c->dir[1 - i].out_len ? EPOLLOUT : 0u); /* and the destination of the other */
        set_fd(R, slot, c, i, want);
    }
}

static void stop_conn(Relay *R, size_t slot, conn_t *c, int side, const char *reason, uint8_t kind) {
    if (!c->running)
        return;
    c->running = 0;
    set_interest(R, slot, c); /* out of the epoll set: also silences EPOLLHUP */
    ev_t *e = c->stop_ev;
    c->stop_ev = NULL;
    size_t rl = strlen(reason);
    if (rl > ERR_LEN)
        rl = ERR_LEN;
    memcpy(e->body, reason, rl);
    e->body[rl] = 0;
    e->blen = rl;
    e->kind = kind;
    e->t = now_mono();
    e->side = (uint8_t)side;
    evlist_t l = {NULL, NULL, 0};
    list_push(&l, e);
    queue_splice(R, &l, 1);
}

/* write p[*off:n] to fd without blocking, advancing *off; 0 (all written, or the socket is full), or the
 * errno of a destination that failed */
static int send_now(int fd, const uint8_t *p, size_t n, size_t *off) {
    while (*off < n) {
        ssize_t w = send(fd, p + *off, n - *off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return errno;
        }
        *off += (size_t)w;
    }
    return 0;
}

/* write what direction d holds to its destination; 0 ok (maybe partial), -1 destination failed */
static int flush_dir(conn_t *c, int d, int *err) {
    dir_t *D = &c->dir[d];
    *err = send_now(c->fd[1 - d], D->out, D->out_len, &D->out_off);
    if (*err)
        return -1;
    if (D->out_off == D->out_len)
        D->out_off = D->out_len = 0;
    return 0;
}

/* bytes from side d (0 client, 1 server): frame, then forward */
static void on_data(Relay *R, size_t slot, conn_t *c, int d, const uint8_t *p, size_t n) {
    char err[ERR_LEN];
    evlist_t got = {NULL, NULL, 0};
    if (n == 0)
        return;
    if (scan_feed(&c->dir[d].sc, R->max_len, p, n, &got, c->id, (uint8_t)d, now_mono(), err) < 0) {
        list_free(&got); /* as the Python scanner: nothing of a malformed chunk is forwarded */
        stop_conn(R, slot, c, d, err, 3);
        return;
    }
    queue_splice(R, &got, 0);
    dir_t *D = &c->dir[d];
    D->total += n;
    size_t off = 0; /* write at once; only what the destination does not take now is copied */
    int e = send_now(c->fd[1 - d], p, n, &off);
    if (e) {
        stop_conn(R, slot, c, 1 - d, strerror(e), 2);
        return;
    }
    if (off < n) {
        uint8_t *nb = realloc(D->out, n - off);
        if (nb == NULL) {
            stop_conn(R, slot, c, d, "out of memory", 2);
            return;
        }
        D->out = nb;
        memcpy(D->out, p + off, n - off);
        D->out_len = n - off;
        D->out_off = 0;
    }
    set_interest(R, slot, c);
}

/* one read from fd i: 1 data relayed, 0 nothing there now, -1 the connection stopped */
static int on_readable(Relay *R, size_t slot, conn_t *c, int i) {
    if (c->dir[i].out_len)
        return 0; /* the previous chunk is still being written */
    for (;;) {
        ssize_t n = recv(c->fd[i], R->buf, READ_SIZE, MSG_DONTWAIT);
        if (n > 0) {
            on_data(R, slot, c, i, R->buf, (size_t)n);
            return c->running ? 1 : -1;
        }
        if (n == 0) {
            stop_conn(R, slot, c, i, "", 2);
            return -1;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        stop_conn(R, slot, c, i, strerror(errno), 2);
        return -1;
    }
}

/* a draining source whose last read has been written: read what it still holds, up to its end */
static void drain_source(Relay *R, size_t slot, conn_t *c, int i) {
    while (c->running && c->draining[i] && c->dir[i].out_len == 0) {
        int r = on_readable(R, slot, c, i);
        if (r == 0) { /* a hung-up socket always reads something, its end or its error */
            stop_conn(R, slot, c, i, "", 2);
            return;
        }
    }
}

static void free_conn(conn_t *c) {
    for (int i = 0; i < 2; i++) {
        if (c->fd[i] >= 0)
            close(c->fd[i]);
        free(c->dir[i].out);
        free(c->dir[i].sc.body);
    }
    free(c->stop_ev);
    free(c);
}

static void finish_close(Relay *R, size_t slot, conn_t *c) {
    for (int i = 0; i < 2; i++)
        set_fd(R, slot, c, i, NOT_REGISTERED);
    if (c->closing)
        R->nclosing--;
    free_conn(c);
    R->conns[slot] = NULL;
}

/* a closing connection: write what is left; done when nothing is, or a destination failed */
static void closing_step(Relay *R, size_t slot, conn_t *c) {
    for (int d = 0; d < 2; d++) {
        int e = 0;
        if (c->dir[d].out_len && flush_dir(c, d, &e) < 0)
            c->dir[d].out_len = c->dir[d].out_off = 0; /* that side is gone: drop what was for it */
    }
    if (c->dir[0].out_len == 0 && c->dir[1].out_len == 0)
        finish_close(R, slot, c);
    else
        set_interest(R, slot, c);
}

static void *relay_main(void *arg) {
    Relay *R = arg;
    struct epoll_event evs[64];
    int timeout = -1;
    for (;;) {
        int n = epoll_wait(R->ep, evs, 64, timeout);
        pthread_mutex_lock(&R->mu);
        if (R->stopping) {
            pthread_mutex_unlock(&R->mu);
            break;
        }
        for (int k = 0; k < n; k++) {
            uint64_t key = evs[k].data.u64;
            if (key == UINT64_MAX) { /* the wake-up fd (shutdown, or a connection started closing) */
                uint64_t junk;
                ssize_t r = read(R->stopfd, &junk, sizeof junk);
                (void)r;
                continue;
            }
            size_t slot = (size_t)((key & 0xffffffffu) >> 1);
            int i = (int)(key & 1);
            if (slot >= R->nconns)
                continue;
            conn_t *c = R->conns[slot];
            if (c == NULL || c->gen != (uint32_t)(key >> 32) || !(c->running || c->closing))
                continue; /* closed or stopped since epoll_wait returned */
            uint32_t got = evs[k].events;
            if (c->closing) {
                if (got & (EPOLLHUP | EPOLLERR)) /* fd i is gone: nothing more reaches it */
                    c->dir[1 - i].out_len = c->dir[1 - i].out_off = 0;
                closing_step(R, slot, c);
                continue;
            }
            if ((got & EPOLLOUT) && c->dir[1 - i].out_len) {
                int e = 0;
                if (flush_dir(c, 1 - i, &e) < 0) {
                    stop_conn(R, slot, c, i, strerror(e), 2);
                    continue;
                }
                set_interest(R, slot, c);
                if (c->dir[1 - i].out_len == 0 && c->draining[1 - i])
                    drain_source(R, slot, c, 1 - i);
                if (!c->running)
                    continue;
            }
            if (got & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                if (c->dir[i].out_len == 0) {
                    on_readable(R, slot, c, i);
                } else if (got & (EPOLLHUP | EPOLLERR)) {
                    /* hung up while its last read is still being written: what it still holds (e.g. the
                     * server's FATAL error before a reset) is read once that write is done */
                    c->draining[i] = 1;
                    set_interest(R, slot, c);
                }
            }
        }
        timeout = -1;
        if (R->nclosing) {
            double now = now_mono();
            for (size_t sl = 0; sl < R->nconns; sl++) {
                conn_t *c = R->conns[sl];
                if (c != NULL && c->closing && now >= c->deadline)
                    finish_close(R, sl, c); /* a reader that does not read gets no more time */
            }
            if (R->nclosing)
                timeout = 100;
        }
        if (R->first_unnotified != 0) {
            double waited_ms = (now_mono() - R->first_unnotified) * 1e3;
            if (waited_ms >= NOTIFY_DELAY_MS) {
                notify(R);
            } else {
                int wait = (int)(NOTIFY_DELAY_MS - waited_ms) + 1;
                if (timeout < 0 || wait < timeout)
                    timeout = wait;
            }
        }
        while (R->q.bytes > QUEUE_HIGH && !R->stopping)
            pthread_cond_wait(&R->drained, &R->mu);
        pthread_mutex_unlock(&R->mu);
    }
    return NULL;
}

/* ---- Python API ------------------------------------------------------------------------------------- */

/* Python-side calls wait for the mutex without the GIL (the thread never takes the GIL, so this cannot
 * deadlock, and other Python threads run meanwhile) */
static void lock_nogil(Relay *R) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&R->mu);
    Py_END_ALLOW_THREADS
}

static int ready(Relay *R) {
    if (!R->initialised || !R->thread_started) {
        PyErr_SetString(PyExc_RuntimeError, "the relay is not running");
        return 0;
    }
    return 1;
}

static int kinds_from(uint8_t *kind, PyObject *allowed, PyObject *wanted) {
    char *a, *w;
    Py_ssize_t na, nw;
    if (PyBytes_AsStringAndSize(allowed, &a, &na) < 0 || PyBytes_AsStringAndSize(wanted, &w, &nw) < 0)
        return -1;
    memset(kind, 0, 256);
    for (Py_ssize_t j = 0; j < na; j++)
        kind[(uint8_t)a[j]] = 1;
    for (Py_ssize_t j = 0; j < nw; j++)
        kind[(uint8_t)w[j]] = 2;
    return 0;
}

static int Relay_init(Relay *R, PyObject *args, PyObject *kw) {
    PyObject *cls, *ca, *cw, *sa, *sw;
    unsigned int ckeep, skeep;
    unsigned long long max_len;
    (void)kw;
    if (R->initialised) {
        PyErr_SetString(PyExc_RuntimeError, "Relay already initialised");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OSSISSIK", &cls, &ca, &cw, &ckeep, &sa, &sw, &skeep, &max_len))
        return -1;
    if (kinds_from(R->kind[0], ca, cw) < 0 || kinds_from(R->kind[1], sa, sw) < 0)
        return -1;
    Py_INCREF(cls);
    R->message_cls = cls;
    R->keep[0] = ckeep;
    R->keep[1] = skeep;
    R->max_len = max_len;
    R->ep = epoll_create1(EPOLL_CLOEXEC);
    R->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    R->stopfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_init(&R->mu, NULL);
    pthread_cond_init(&R->drained, NULL);
    R->initialised = 1; /* from here on, dealloc closes what is open */
    if (R->ep < 0 || R->efd < 0 || R->stopfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ee;
    ee.events = EPOLLIN;
    ee.data.u64 = UINT64_MAX;
    epoll_ctl(R->ep, EPOLL_CTL_ADD, R->stopfd, &ee);
    sigset_t all, old; /* signals are the main thread's business */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&R->thread, NULL, relay_main, R);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        PyErr_SetString(PyExc_OSError, "cannot start the relay thread");
        return -1;
    }
    R->thread_started = 1;
    return 0;
}

static void relay_shutdown(Relay *R) {
    if (!R->thread_started)
        return;
    R->thread_started = 0; /* (under the GIL: a second caller returns above) */
    lock_nogil(R);
    R->stopping = 1;
    pthread_cond_broadcast(&R->drained);
    pthread_mutex_unlock(&R->mu);
    uint64_t one = 1;
    ssize_t w = write(R->stopfd, &one, sizeof one);
    (void)w;
    pthread_t th = R->thread;
    Py_BEGIN_ALLOW_THREADS
    pthread_join(th, NULL);
    Py_END_ALLOW_THREADS
    for (size_t s = 0; s < R->nconns; s++) {
        if (R->conns[s]) {
            free_conn(R->conns[s]);
            R->conns[s] = NULL;
        }
    }
    list_free(&R->q);
}

static PyObject *Relay_shutdown(Relay *R, PyObject *Py_UNUSED(ignored)) {
    relay_shutdown(R);
    Py_RETURN_NONE;
}

static void Relay_dealloc(Relay *R) {
    relay_shutdown(R);
    free(R->conns);
    if (R->initialised) {
        if (R->ep >= 0)
            close(R->ep);
        if (R->efd >= 0)
            close(R->efd);
        if (R->stopfd >= 0)
            close(R->stopfd);
        pthread_mutex_destroy(&R->mu);
        pthread_cond_destroy(&R->drained);
    }
    Py_XDECREF(R->message_cls);
    Py_TYPE(R)->tp_free((PyObject *)R);
}

static PyObject *Relay_fileno(Relay *R, PyObject *Py_UNUSED(ignored)) {
    if (!ready(R))
        return NULL;
    return PyLong_FromLong(R->efd);
}

static PyObject *Relay_add(Relay *R, PyObject *args) {
    int cfd, sfd;
    Py_buffer fc, fs;
    if (!PyArg_ParseTuple(args, "iiy*y*", &cfd, &sfd, &fc, &fs))
        return NULL;
    PyObject *ret = NULL;
    if (!ready(R))
        goto done;
    conn_t *c = calloc(1, sizeof(conn_t));
    ev_t *stop_ev = ev_new(0, 2, 0, NULL, ERR_LEN);
    if (c == NULL || stop_ev == NULL) {
        free(c);
        free(stop_ev);
        PyErr_NoMemory();
        goto done;
    }
    c->stop_ev = stop_ev;
    c->fd[0] = cfd;
    c->fd[1] = sfd;
    for (int i = 0; i < 2; i++) {
        c->dir[i].sc.kind = R->kind[i];
        c->dir[i].sc.keep = R->keep[i];
        c->dir[i].sc.btype = -1;
    }
    lock_nogil(R);
    size_t slot = 0;
    while (slot < R->nconns && R->conns[slot] != NULL)
        slot++;
    if (slot == R->nconns) {
        size_t nn = R->nconns ? R->nconns * 2 : 16;
        conn_t **nt = realloc(R->conns, nn * sizeof(conn_t *));
        if (nt == NULL) {
            pthread_mutex_unlock(&R->mu);
            free(c);
            free(stop_ev);
            PyErr_NoMemory();
            goto done;
        }
        memset(nt + R->nconns, 0, (nn - R->nconns) * sizeof(conn_t *));
        R->conns = nt;
        R->nconns = nn;
    }
    static uint32_t gen = 0;
    c->gen = ++gen;
    c->id = ++R->next_id;
    stop_ev->id = c->id;
    c->running = 1;
    for (int i = 0; i < 2; i++) {
        struct epoll_event ee;
        ee.events = 0;
        ee.data.u64 = ep_key(slot, c->gen, i);
        if (epoll_ctl(R->ep, EPOLL_CTL_ADD, c->fd[i], &ee) < 0) {
            int e = errno;
            if (i == 1)
                epoll_ctl(R->ep, EPOLL_CTL_DEL, c->fd[0], NULL);
            pthread_mutex_unlock(&R->mu);
            free(c);
            free(stop_ev);
            errno = e;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
    }
    R->conns[slot] = c;
    on_data(R, slot, c, 1, fs.buf, (size_t)fs.len); /* the server's first, as the Python relay */
    if (c->running)
        on_data(R, slot, c, 0, fc.buf, (size_t)fc.len);
    set_interest(R, slot, c);
    if (R->first_unnotified != 0)
        notify(R); /* the thread may be asleep in epoll_wait without a timeout */
    unsigned long long id = c->id;
    pthread_mutex_unlock(&R->mu);
    ret = PyLong_FromUnsignedLongLong(id);
done:
    PyBuffer_Release(&fc);
    PyBuffer_Release(&fs);
    return ret;
}

static PyObject *Relay_close(Relay *R, PyObject *args) {
    unsigned long long id;
    Py_buffer tc, ts;
    if (!PyArg_ParseTuple(args, "Ky*y*", &id, &tc, &ts))
        return NULL;
    unsigned long long up = 0, down = 0;
    if (!ready(R)) {
        PyBuffer_Release(&tc);
        PyBuffer_Release(&ts);
        return NULL;
    }
    lock_nogil(R);
    for (size_t s = 0; s < R->nconns; s++) {
        conn_t *c = R->conns[s];
        if (c == NULL || c->id != id || c->closing)
            continue;
        up = c->dir[0].total;
        down = c->dir[1].total;
        c->running = 0;
        /* what is left to write, then the given bytes: direction 0 ends at the server, 1 at the client */
        const Py_buffer *extra[2] = {&ts, &tc};
        for (int d = 0; d < 2; d++) {
            dir_t *D = &c->dir[d];
            if (!extra[d]->len)
                continue;
            size_t left = D->out_len - D->out_off;
            uint8_t *nb = malloc(left + (size_t)extra[d]->len);
            if (nb == NULL)
                continue; /* out of memory: the final bytes are dropped, the end still comes */
            if (left)
                memcpy(nb, D->out + D->out_off, left);
            memcpy(nb + left, extra[d]->buf, (size_t)extra[d]->len);
            free(D->out);
            D->out = nb;
            D->out_len = left + (size_t)extra[d]->len;
            D->out_off = 0;
        }
        c->closing = 1;
        c->draining[0] = c->draining[1] = 0;
        c->deadline = now_mono() + CLOSE_GRACE_S;
        R->nclosing++;
        closing_step(R, s, c); /* done now, or the thread finishes it (at most CLOSE_GRACE_S) */
        if (R->conns[s] != NULL) {
            uint64_t one = 1; /* wake the thread: its epoll_wait may have no timeout */
            ssize_t w = write(R->stopfd, &one, sizeof one);
            (void)w;
        }
        break;
    }
    pthread_mutex_unlock(&R->mu);
    PyBuffer_Release(&tc);
    PyBuffer_Release(&ts);
    return Py_BuildValue("(KK)", up, down);
}

static PyObject *Relay_drain(Relay *R, PyObject *Py_UNUSED(ignored)) {
    if (!ready(R))
        return NULL;
    lock_nogil(R);
    uint64_t junk;
    ssize_t r = read(R->efd, &junk, sizeof junk);
    (void)r;
    ev_t *e = R->q.head;
    R->q.head = R->q.tail = NULL;
    R->q.bytes = 0;
    R->notified = 0;
    R->first_unnotified = 0;
    pthread_cond_broadcast(&R->drained);
    pthread_mutex_unlock(&R->mu);

    PyObject *out = PyList_New(0);
    PyObject *run = NULL; /* the current run's message list */
    uint64_t run_id = 0;
    int run_kind = -1;
    double run_t = 0;
    while (e) {
        ev_t *next = e->next;
        if (out != NULL) {
            if (e->kind <= 1) {
                if (run == NULL || run_id != e->id || run_kind != e->kind || run_t != e->t) {
                    run = PyList_New(0);
                    PyObject *item = run ? Py_BuildValue("(KidO)", (unsigned long long)e->id, (int)e->kind,
                                                         e->t, run) : NULL;
                    Py_XDECREF(run); /* the tuple holds it */
                    if (item == NULL || PyList_Append(out, item) < 0) {
                        Py_XDECREF(item);
                        Py_CLEAR(out);
                        run = NULL;
                    } else {
                        Py_DECREF(item);
                        run_id = e->id;
                        run_kind = e->kind;
                        run_t = e->t;
                    }
                }
                if (out != NULL) {
                    PyObject *m = PyObject_CallFunction(R->message_cls, "iy#KOK", (int)e->type, e->body,
                                                        (Py_ssize_t)e->blen, (unsigned long long)e->length,
                                                        e->truncated ? Py_True : Py_False,
                                                        (unsigned long long)e->mark);
                    if (m == NULL || PyList_Append(run, m) < 0)
                        Py_CLEAR(out);
                    Py_XDECREF(m);
                }
            } else {
                run = NULL;
                run_kind = -1;
                PyObject *item = Py_BuildValue("(Kid(is#))", (unsigned long long)e->id, (int)e->kind, e->t,
                                               (int)e->side, e->body, (Py_ssize_t)e->blen);
                if (item == NULL || PyList_Append(out, item) < 0)
                    Py_CLEAR(out);
                Py_XDECREF(item);
            }
        }
        free(e);
        e = next;
    }
    return out;
}

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)Relay_add, METH_VARARGS, "add(client_fd, server_fd, from_client, from_server) -> id"},
    {"close", (PyCFunction)Relay_close, METH_VARARGS, "close(id, to_client, to_server) -> (up, down)"},
    {"drain", (PyCFunction)Relay_drain, METH_NOARGS, "drain() -> [(id, kind, t, payload)]"},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "the eventfd that signals events"},
    {"shutdown", (PyCFunction)Relay_shutdown, METH_NOARGS, "stop the thread, close every socket"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pcigate._crelay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
    .tp_doc = "The tunnel's C relay thread (see the module's header).",
};

static struct PyModuleDef crelay_module = {
    PyModuleDef_HEAD_INIT, "_crelay", "The PostgreSQL tunnel's byte relay in C.", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__crelay(void) {
    if (PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&crelay_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
