/* agent.proxy._hotpath: the compiled twin of the tunnel's per-message work (issue #19).
 *
 * Owns these steps of a small message's path through a tunnel, each the exact equivalent of pure
 * Python kept as the reference (agent/proxy/mux.py, agent/proxy/endpoints.py; agent/proxy/hotpath.py
 * chooses which one runs and tests/unit run the same vectors against both):
 *
 *   FrameDecoder      tcpmesh/2 frame decoding (mux.PyFrameDecoder): feed() and feed_parts(), the same
 *                     frames, the same limits, the same MuxProtocolError messages, bounded buffering
 *                     (at most one frame: HEADER + MAX_FRAME for feed, HEADER + MAX_CONTROL_PAYLOAD
 *                     for feed_parts, which hands DATA payloads out as views of its input).
 *   seal_data         a DATA frame (header and payload in one buffer) written to an ssl SSLObject's
 *                     C object and the TLS records it made read from the outgoing memory BIO:
 *                     one call instead of encode_header + concatenation + write + flush.
 *   decrypt           the receive loop of TlsLeg._decrypt_into: read plaintext into a buffer until
 *                     nothing is left to decrypt, the buffer is full, or the peer ended the stream,
 *                     without provoking SSLWantReadError (building it is the costliest step).
 *   receive           one read of an established tunnel in one call: the bytes into the incoming BIO,
 *                     decrypt, feed_parts, and each frame handed over (DATA to its stream's on_data,
 *                     the others to the session's dispatch) — TlsLeg.data_received → _decrypt_into →
 *                     MuxSession.leg_data, which stay the reference; inside it the relay step
 *                     tunnel → app (stream_deliver).
 *   relay_send        the relay step app → tunnel: a plain leg's read relayed to its stream, framed,
 *                     sealed and written to the tunnel (PlainLeg.buffer_updated → Relay.leg_data →
 *                     Stream.write → TlsLeg.write_data_frame).
 *   LegCore ...       the core types: the steady-state fields of legs, streams, relays and sessions as
 *   SessionCore       C struct members, the bases of the Python classes (agent/proxy/state.py), which
 *                     the relay steps read without attribute lookups.
 *
 * Nothing here touches a socket or keeps a Python object past a call, beyond the fields of the core
 * types' instances (which Python sets) and the configuration handed over once by configure() (the
 * Frame class, the FrameType members, the error classes);
 * receive() calls back into Python (a stream's on_data, the session's dispatch) for every frame but a
 * small DATA part on a steady relay to a plain socket (the relay steps below, on the core types' fields).
 * Built from source by `make setup` (setup.py, the machine's gcc); without it the pure-Python
 * path runs. It must not import any tcpmesh module.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define HEADER_SIZE 12
#define N_KINDS 8
#define KIND_DATA 3
#define KIND_GOAWAY 7

/* configure(): set once from agent/proxy/mux.py */
static PyObject *frame_class;            /* mux.Frame, a NamedTuple (a tuple subclass) */
static PyObject *kinds[N_KINDS];         /* FrameType members by value; NULL for values not in use */
static PyObject *kind_names[N_KINDS];    /* their names (str) */
static PyObject *protocol_error;         /* mux.MuxProtocolError */
static PyObject *want_read_error;        /* ssl.SSLWantReadError */
static PyObject *zero_return_error;      /* ssl.SSLZeroReturnError */
static Py_ssize_t max_frame = -1;
static Py_ssize_t max_control = -1;
static PyObject *str_read, *str_write, *str_pending, *str_on_data, *str_bytes_read;

/* the methods the relay steps call back into (interned at module init) */
#define LEG_NAMES(X) X(is_closing) X(_settle) X(_return_credit) X(update_writer_blocked)
#define DECLARE_NAME(n) static PyObject *s_##n;
LEG_NAMES(DECLARE_NAME)

static int configured(void) {
    if (frame_class == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "agent.proxy._hotpath used before configure()");
        return 0;
    }
    return 1;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *cls, *kind_list, *error, *want_read, *zero_return;
    Py_ssize_t frame_limit, control_limit;
    if (!PyArg_ParseTuple(args, "OOOOOnn", &cls, &kind_list, &error, &want_read, &zero_return,
                          &frame_limit, &control_limit))
        return NULL;
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "configure: the Frame class must be a tuple subclass (a NamedTuple)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(kind_list, "configure: the frame types must be a sequence");
    if (seq == NULL) return NULL;
    for (int i = 0; i < N_KINDS; i++) { Py_CLEAR(kinds[i]); Py_CLEAR(kind_names[i]); }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *kind = PySequence_Fast_GET_ITEM(seq, i);
        long value = PyLong_AsLong(kind);
        if (value == -1 && PyErr_Occurred()) { Py_DECREF(seq); return NULL; }
        if (value < 0 || value >= N_KINDS) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "configure: frame type %ld outside 0..%d", value, N_KINDS - 1);
            return NULL;
        }
        PyObject *name = PyObject_GetAttrString(kind, "name");
        if (name == NULL) { Py_DECREF(seq); return NULL; }
        Py_INCREF(kind);
        Py_XSETREF(kinds[value], kind);
        Py_XSETREF(kind_names[value], name);
    }
    Py_DECREF(seq);
    Py_INCREF(cls); Py_XSETREF(frame_class, cls);
    Py_INCREF(error); Py_XSETREF(protocol_error, error);
    Py_INCREF(want_read); Py_XSETREF(want_read_error, want_read);
    Py_INCREF(zero_return); Py_XSETREF(zero_return_error, zero_return);
    max_frame = frame_limit;
    max_control = control_limit;
    Py_RETURN_NONE;
}

/* A Frame(kind, stream, payload); steals the reference to payload. */
static PyObject *make_frame(int kind, uint32_t stream, PyObject *payload) {
    if (payload == NULL) return NULL;
    PyTypeObject *type = (PyTypeObject *)frame_class;
    PyObject *frame = type->tp_alloc(type, 3);
    PyObject *stream_obj = PyLong_FromUnsignedLong(stream);
    if (frame == NULL || stream_obj == NULL) {
        Py_XDECREF(frame); Py_XDECREF(stream_obj); Py_DECREF(payload);
        return NULL;
    }
    Py_INCREF(kinds[kind]);
    PyTuple_SET_ITEM(frame, 0, kinds[kind]);
    PyTuple_SET_ITEM(frame, 1, stream_obj);
    PyTuple_SET_ITEM(frame, 2, payload);
    return frame;
}

static int append_frame(PyObject *frames, int kind, uint32_t stream, PyObject *payload) {
    PyObject *frame = make_frame(kind, stream, payload);
    if (frame == NULL) return -1;
    int rc = PyList_Append(frames, frame);
    Py_DECREF(frame);
    return rc;
}

/* mux._check_header: 0 and (kind, stream, length) filled in, or -1 with MuxProtocolError set. */
static int check_header(const unsigned char *p, int *kind, uint32_t *stream, Py_ssize_t *length) {
    unsigned int type = p[0];
    uint32_t s = ((uint32_t)p[4] << 24) | ((uint32_t)p[5] << 16) | ((uint32_t)p[6] << 8) | p[7];
    uint32_t n = ((uint32_t)p[8] << 24) | ((uint32_t)p[9] << 16) | ((uint32_t)p[10] << 8) | p[11];
    if ((Py_ssize_t)n > max_frame) {
        PyErr_Format(protocol_error, "frame of %lu bytes on stream %lu exceeds the limit of %zd",
                     (unsigned long)n, (unsigned long)s, max_frame);
        return -1;
    }
    if (type >= N_KINDS || kinds[type] == NULL) {
        PyErr_Format(protocol_error, "unknown frame type %u on stream %lu", type, (unsigned long)s);
        return -1;
    }
    if (type != KIND_DATA && (Py_ssize_t)n > max_control) {
        PyErr_Format(protocol_error, "%U frame of %lu bytes exceeds %zd", kind_names[type], (unsigned long)n,
                     max_control);
        return -1;
    }
    if (s == 0 && type != KIND_GOAWAY) {
        PyErr_Format(protocol_error, "%U frame on stream 0", kind_names[type]);
        return -1;
    }
    *kind = (int)type;
    *stream = s;
    *length = (Py_ssize_t)n;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* FrameDecoder                                                                                   */

typedef struct {
    PyObject_HEAD
    unsigned char *buf;     /* a header or a frame begun in an earlier call */
    Py_ssize_t len, cap;
    uint32_t data_stream;   /* feed_parts: the DATA frame whose payload is arriving */
    Py_ssize_t data_left;
} Decoder;

static int buf_append(Decoder *d, const unsigned char *p, Py_ssize_t n) {
    if (n <= 0) return 0;
    if (d->len + n > d->cap) {
        Py_ssize_t cap = d->cap ? d->cap : 64;
        while (cap < d->len + n) cap *= 2;
        unsigned char *grown = PyMem_Realloc(d->buf, (size_t)cap);
        if (grown == NULL) { PyErr_NoMemory(); return -1; }
        d->buf = grown;
        d->cap = cap;
    }
    memcpy(d->buf + d->len, p, (size_t)n);
    d->len += n;
    return 0;
}

static void buf_clear(Decoder *d) {
    d->len = 0;
    if (d->cap > 4096) { /* a large control or whole frame was buffered: give its memory back */
        PyMem_Free(d->buf);
        d->buf = NULL;
        d->cap = 0;
    }
}

static PyObject *Decoder_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (!configured()) return NULL;
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "FrameDecoder() takes no arguments");
        return NULL;
    }
    Decoder *d = (Decoder *)type->tp_alloc(type, 0);
    return (PyObject *)d;
}

static void Decoder_dealloc(Decoder *d) {
    PyMem_Free(d->buf);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

/* feed: whole frames, payloads copied (bytes). */
static PyObject *Decoder_feed(Decoder *d, PyObject *data) {
    Py_buffer in;
    if (PyObject_GetBuffer(data, &in, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *p = in.buf;
    Py_ssize_t pos = 0, end = in.len;
    PyObject *frames = PyList_New(0);
    if (frames == NULL) goto fail;
    int kind; uint32_t stream; Py_ssize_t length;
    if (d->len) { /* complete the frame begun earlier */
        if (d->len < HEADER_SIZE) {
            Py_ssize_t take = HEADER_SIZE - d->len < end - pos ? HEADER_SIZE - d->len : end - pos;
            if (buf_append(d, p + pos, take) < 0) goto fail;
            pos += take;
            if (d->len < HEADER_SIZE) goto done;
        }
        if (check_header(d->buf, &kind, &stream, &length) < 0) goto fail;
        Py_ssize_t want = HEADER_SIZE + length - d->len;
        Py_ssize_t take = want < end - pos ? want : end - pos;
        if (buf_append(d, p + pos, take) < 0) goto fail;
        pos += take;
        if (d->len < HEADER_SIZE + length) goto done;
        if (append_frame(frames, kind, stream,
                         PyBytes_FromStringAndSize((const char *)d->buf + HEADER_SIZE, length)) < 0) goto fail;
        buf_clear(d);
    }
    while (end - pos >= HEADER_SIZE) {
        if (check_header(p + pos, &kind, &stream, &length) < 0) goto fail;
        Py_ssize_t start = pos + HEADER_SIZE;
        if (end - start < length) break;
        if (append_frame(frames, kind, stream,
                         PyBytes_FromStringAndSize((const char *)p + start, length)) < 0) goto fail;
        pos = start + length;
    }
    if (buf_append(d, p + pos, end - pos) < 0) goto fail;
done:
    PyBuffer_Release(&in);
    return frames;
fail:
    PyBuffer_Release(&in);
    Py_XDECREF(frames);
    return NULL;
}

/* view[start:stop] of the memoryview ``view`` */
static PyObject *view_slice(PyObject *view, Py_ssize_t start, Py_ssize_t stop) {
    PyObject *a = PyLong_FromSsize_t(start), *b = PyLong_FromSsize_t(stop);
    if (a == NULL || b == NULL) { Py_XDECREF(a); Py_XDECREF(b); return NULL; }
    PyObject *slice = PySlice_New(a, b, NULL);
    Py_DECREF(a); Py_DECREF(b);
    if (slice == NULL) return NULL;
    PyObject *part = PyObject_GetItem(view, slice);
    Py_DECREF(slice);
    return part;
}

/* feed_parts: DATA payloads handed out as they arrive, as views of ``data``; control frames whole. */
static PyObject *Decoder_feed_parts(Decoder *d, PyObject *data) {
    PyObject *view = PyMemoryView_FromObject(data);
    if (view == NULL) return NULL;
    Py_buffer *in = PyMemoryView_GET_BUFFER(view);
    if (!PyBuffer_IsContiguous(in, 'C')) {
        Py_DECREF(view);
        PyErr_SetString(PyExc_ValueError, "feed_parts needs a contiguous buffer");
        return NULL;
    }
    const unsigned char *p = in->buf;
    Py_ssize_t pos = 0, end = in->len;
    PyObject *frames = PyList_New(0);
    if (frames == NULL) goto fail;
    int kind; uint32_t stream; Py_ssize_t length;
    for (;;) {
        if (d->data_left) {
            if (pos == end) break;
            Py_ssize_t take = d->data_left < end - pos ? d->data_left : end - pos;
            if (append_frame(frames, KIND_DATA, d->data_stream, view_slice(view, pos, pos + take)) < 0) goto fail;
            d->data_left -= take;
            pos += take;
            continue;
        }
        if (d->len) { /* a header (or a control frame) begun in an earlier call */
            if (d->len < HEADER_SIZE) {
                Py_ssize_t take = HEADER_SIZE - d->len < end - pos ? HEADER_SIZE - d->len : end - pos;
                if (buf_append(d, p + pos, take) < 0) goto fail;
                pos += take;
                if (d->len < HEADER_SIZE) break;
            }
            if (check_header(d->buf, &kind, &stream, &length) < 0) goto fail;
            if (kind == KIND_DATA) {
                buf_clear(d);
                d->data_stream = stream;
                d->data_left = length;
                if (length == 0 && append_frame(frames, KIND_DATA, stream, PyBytes_FromStringAndSize(NULL, 0)) < 0)
                    goto fail;
                continue;
            }
            Py_ssize_t want = HEADER_SIZE + length - d->len;
            Py_ssize_t take = want < end - pos ? want : end - pos;
            if (buf_append(d, p + pos, take) < 0) goto fail;
            pos += take;
            if (d->len < HEADER_SIZE + length) break;
            if (append_frame(frames, kind, stream,
                             PyBytes_FromStringAndSize((const char *)d->buf + HEADER_SIZE, length)) < 0) goto fail;
            buf_clear(d);
            continue;
        }
        if (end - pos < HEADER_SIZE) {
            if (buf_append(d, p + pos, end - pos) < 0) goto fail;
            break;
        }
        if (check_header(p + pos, &kind, &stream, &length) < 0) goto fail;
        Py_ssize_t start = pos + HEADER_SIZE;
        if (kind == KIND_DATA) {
            pos = start;
            d->data_stream = stream;
            d->data_left = length;
            if (length == 0 && append_frame(frames, KIND_DATA, stream, PyBytes_FromStringAndSize(NULL, 0)) < 0)
                goto fail;
            continue;
        }
        if (end - start < length) {
            if (buf_append(d, p + pos, end - pos) < 0) goto fail;
            break;
        }
        if (append_frame(frames, kind, stream, PyBytes_FromStringAndSize((const char *)p + start, length)) < 0)
            goto fail;
        pos = start + length;
    }
    Py_DECREF(view);
    return frames;
fail:
    Py_DECREF(view);
    Py_XDECREF(frames);
    return NULL;
}

static PyObject *Decoder_pending(Decoder *d, void *closure) { return PyLong_FromSsize_t(d->len); }
static PyObject *Decoder_in_data(Decoder *d, void *closure) { return PyBool_FromLong(d->data_left > 0); }

static PyMethodDef Decoder_methods[] = {
    {"feed", (PyCFunction)Decoder_feed, METH_O, "Whole frames from data (payloads copied)."},
    {"feed_parts", (PyCFunction)Decoder_feed_parts, METH_O,
     "Frames from data; DATA payloads as views of data, in parts as they arrive."},
    {NULL}
};

static PyGetSetDef Decoder_getset[] = {
    {"pending", (getter)Decoder_pending, NULL, "bytes received but not yet returned", NULL},
    {"in_data", (getter)Decoder_in_data, NULL, "feed_parts: in the middle of a DATA frame's payload", NULL},
    {NULL}
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.proxy._hotpath.FrameDecoder",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "tcpmesh/2 frame decoder, the compiled twin of agent.proxy.mux.PyFrameDecoder.",
    .tp_new = Decoder_new,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_methods = Decoder_methods,
    .tp_getset = Decoder_getset,
};

/* ---------------------------------------------------------------------------------------------- */
/* TLS steps                                                                                      */

/* A DATA frame (header and payload) as bytes: what a kernel TLS leg hands the kernel to seal. */
static PyObject *data_frame(unsigned long stream, const void *payload, Py_ssize_t n) {
    PyObject *frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + n);
    if (frame == NULL) return NULL;
    unsigned char *h = (unsigned char *)PyBytes_AS_STRING(frame);
    uint32_t len = (uint32_t)n;
    h[0] = KIND_DATA; h[1] = 0; h[2] = 0; h[3] = 0;
    h[4] = (unsigned char)(stream >> 24); h[5] = (unsigned char)(stream >> 16);
    h[6] = (unsigned char)(stream >> 8); h[7] = (unsigned char)stream;
    h[8] = (unsigned char)(len >> 24); h[9] = (unsigned char)(len >> 16);
    h[10] = (unsigned char)(len >> 8); h[11] = (unsigned char)len;
    memcpy(h + HEADER_SIZE, payload, (size_t)n);
    return frame;
}

/* The TLS records of one DATA frame (header and ``n`` bytes of payload written to the SSLObject's C
 * object in one buffer), read back from the outgoing BIO; NULL with an exception set. */
static PyObject *seal_frame(PyObject *sslobj, PyObject *outgoing, unsigned long stream, const void *payload,
                            Py_ssize_t n) {
    PyObject *frame = data_frame(stream, payload, n);
    if (frame == NULL) return NULL;
    PyObject *call[2] = {sslobj, frame};
    PyObject *written = PyObject_VectorcallMethod(str_write, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(frame);
    if (written == NULL) return NULL;
    Py_DECREF(written);
    return PyObject_VectorcallMethod(str_read, &outgoing, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* seal_data(sslobj, outgoing, stream, data) -> bytes: the DATA frame written as TLS records; what
 * the outgoing BIO holds afterwards (the caller writes it to the tunnel). sslobj is an
 * ssl.SSLObject's _sslobj. */
static PyObject *seal_data(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "seal_data(sslobj, outgoing, stream, data)");
        return NULL;
    }
    unsigned long stream = PyLong_AsUnsignedLong(args[2]);
    if (stream == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (stream > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_OverflowError, "stream id above 2**32 - 1");
        return NULL;
    }
    Py_buffer in;
    if (PyObject_GetBuffer(args[3], &in, PyBUF_SIMPLE) < 0) return NULL;
    if (in.len > max_frame || max_frame < 0) {
        PyBuffer_Release(&in);
        PyErr_Format(PyExc_ValueError, "seal_data: %zd bytes do not fit one frame", in.len);
        return NULL;
    }
    PyObject *records = seal_frame(args[0], args[1], stream, in.buf, in.len);
    PyBuffer_Release(&in);
    return records;
}

static Py_ssize_t call_size(PyObject *result) {
    if (result == NULL) return -1;
    Py_ssize_t n = PyLong_AsSsize_t(result);
    Py_DECREF(result);
    return n;
}

/* decrypt(sslobj, incoming, buffer, filled) -> (filled, state): TlsLeg._decrypt_into's inner loop.
 * Reads plaintext into ``buffer`` (a writable memoryview) from offset ``filled`` until
 *   state 0: nothing is left to decrypt (the incoming BIO and OpenSSL hold no more; or a read
 *            asked for more bytes: SSLWantReadError, swallowed),
 *   state 1: the buffer is full (deliver it, then call again with filled 0),
 *   state 2: the peer ended the stream (close_notify: a read returned 0 or SSLZeroReturnError).
 * Any other error (ssl.SSLError) propagates. */
/* The loop of decrypt(): plaintext into ``buffer`` from ``*filled``; the state (0, 1, 2, see below),
 * or -1 with an exception set. */
static int decrypt_loop(PyObject *sslobj, PyObject *incoming, PyObject *buffer, Py_ssize_t *filled_io) {
    Py_ssize_t size = PyMemoryView_GET_BUFFER(buffer)->len;
    Py_ssize_t filled = *filled_io;
    int state = 0;
    for (;;) {
        if (filled) { /* a further read with nothing left would only raise SSLWantReadError */
            PyObject *bio_pending = PyObject_GetAttr(incoming, str_pending);
            Py_ssize_t n = call_size(bio_pending);
            if (n < 0 && PyErr_Occurred()) return -1;
            if (n == 0) {
                Py_ssize_t held = call_size(PyObject_VectorcallMethod(str_pending, &sslobj,
                                                                      1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL));
                if (held < 0 && PyErr_Occurred()) return -1;
                if (held == 0) break;
            }
        }
        PyObject *target = buffer;
        int sliced = 0;
        if (filled) {
            target = view_slice(buffer, filled, size);
            if (target == NULL) return -1;
            sliced = 1;
        }
        PyObject *want = PyLong_FromSsize_t(size - filled);
        if (want == NULL) { if (sliced) Py_DECREF(target); return -1; }
        PyObject *call[3] = {sslobj, want, target};
        PyObject *got = PyObject_VectorcallMethod(str_read, call, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(want);
        if (sliced) Py_DECREF(target);
        if (got == NULL) {
            if (PyErr_ExceptionMatches(want_read_error)) { PyErr_Clear(); break; }
            if (PyErr_ExceptionMatches(zero_return_error)) { PyErr_Clear(); state = 2; break; }
            return -1;
        }
        Py_ssize_t n = call_size(got);
        if (n < 0) return -1;
        if (n == 0) { state = 2; break; }
        filled += n;
        if (filled == size) { state = 1; break; }
    }
    *filled_io = filled;
    return state;
}

/* decrypt(sslobj, incoming, buffer, filled) -> (filled, state): TlsLeg._decrypt_into's inner loop.
 * Reads plaintext into ``buffer`` (a writable memoryview) from offset ``filled`` until
 *   state 0: nothing is left to decrypt (the incoming BIO and OpenSSL hold no more; or a read
 *            asked for more bytes: SSLWantReadError, swallowed),
 *   state 1: the buffer is full (deliver it, then call again with filled 0),
 *   state 2: the peer ended the stream (close_notify: a read returned 0 or SSLZeroReturnError).
 * Any other error (ssl.SSLError) propagates. */
static PyObject *decrypt(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyMemoryView_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "decrypt(sslobj, incoming, buffer: memoryview, filled)");
        return NULL;
    }
    if (want_read_error == NULL && !configured()) return NULL;
    Py_ssize_t size = PyMemoryView_GET_BUFFER(args[2])->len;
    Py_ssize_t filled = PyLong_AsSsize_t(args[3]);
    if (filled == -1 && PyErr_Occurred()) return NULL;
    if (filled < 0 || filled > size) {
        PyErr_SetString(PyExc_ValueError, "decrypt: filled outside the buffer");
        return NULL;
    }
    int state = decrypt_loop(args[0], args[1], args[2], &filled);
    if (state < 0) return NULL;
    return Py_BuildValue("(ni)", filled, state);
}

/* ---------------------------------------------------------------------------------------------- */
/* The relay state: the steady-state fields of legs, streams, relays and sessions as C structs   */
/*
 * Base types of the data path's Python classes (agent/proxy/state.py chooses these or their pure-Python
 * twins with the same __slots__): Leg(LegCore, ...), PlainLeg(Leg, PlainCore), TlsLeg(Leg, TlsCore),
 * Stream(Leg, StreamCore), Relay(RelayCore), MuxSession(SessionCore). Every field is a T_OBJECT_EX
 * member — exactly a __slots__ slot: Python reads and writes it as an attribute (the interpreter
 * specialises that access as it does for __slots__; an unset field raises AttributeError), and the
 * relay steps below read it as a struct field, with no attribute lookup. The fields hold what Python
 * puts there (ints, bools, None, objects); the steps check each before use and leave anything
 * unexpected to the Python steps.
 *
 * The steps take only instances of "the" class on a core: one whose type's tp_base is the core itself
 * (Stream, PlainLeg, TlsLeg, Relay, MuxSession; a subclass of those, which may override a step, has its
 * parent as tp_base and is left to Python). No registration is needed.
 */

typedef struct {
    PyObject_HEAD
    PyObject *transport, *receiver, *bytes_read, *bytes_written, *peer_eof, *eof_sent;
} LegCore;

typedef struct {
    LegCore leg;
    PyObject *_fd; /* the socket's descriptor once a large view was written (PlainLeg._send_view); also what
                      makes PlainCore a layout of its own, so that PlainLeg's tp_base is PlainCore */
} PlainCore;

typedef struct {
    LegCore leg;
    PyObject *_sslobj, *_incoming, *_outgoing; /* the SSLObject's C object (None before TLS starts), the BIOs */
} TlsCore;

typedef struct {
    LegCore leg;
    PyObject *session, *id, *send_window, *_queued, *_writer_blocked, *_reading_paused, *_unreturned, *_finished,
        *_sink, *_debt, *_threshold;
} StreamCore;

typedef struct {
    PyObject_HEAD
    PyObject *a, *b, *_a_to_b, *_b_to_a;
} RelayCore;

typedef struct {
    PyObject_HEAD
    PyObject *tls, *tunnel_blocked;
} SessionCore;

/* Every core is PyObject_HEAD then PyObject * fields: one traverse and one clear walk them. */
#define CORE_FIELDS(o) ((PyObject **)((char *)(o) + sizeof(PyObject)))
#define CORE_COUNT(T) ((Py_ssize_t)((sizeof(T) - sizeof(PyObject)) / sizeof(PyObject *)))

static int fields_traverse(PyObject *o, Py_ssize_t n, visitproc visit, void *arg) {
    PyObject **f = CORE_FIELDS(o);
    for (Py_ssize_t i = 0; i < n; i++) Py_VISIT(f[i]);
    return 0;
}

static void fields_clear(PyObject *o, Py_ssize_t n) {
    PyObject **f = CORE_FIELDS(o);
    for (Py_ssize_t i = 0; i < n; i++) Py_CLEAR(f[i]);
}

#define MEMBER(T, name) {#name, T_OBJECT_EX, offsetof(T, name), 0, NULL}
#define LEG_MEMBERS(T, path) \
    {"transport", T_OBJECT_EX, offsetof(T, path transport), 0, NULL}, \
    {"receiver", T_OBJECT_EX, offsetof(T, path receiver), 0, NULL}, \
    {"bytes_read", T_OBJECT_EX, offsetof(T, path bytes_read), 0, NULL}, \
    {"bytes_written", T_OBJECT_EX, offsetof(T, path bytes_written), 0, NULL}, \
    {"peer_eof", T_OBJECT_EX, offsetof(T, path peer_eof), 0, NULL}, \
    {"eof_sent", T_OBJECT_EX, offsetof(T, path eof_sent), 0, NULL}

static PyMemberDef LegCore_members[] = {LEG_MEMBERS(LegCore, ), {NULL}};
static PyMemberDef TlsCore_members[] = {
    MEMBER(TlsCore, _sslobj), MEMBER(TlsCore, _incoming), MEMBER(TlsCore, _outgoing), {NULL}};
static PyMemberDef StreamCore_members[] = {
    MEMBER(StreamCore, session), MEMBER(StreamCore, id), MEMBER(StreamCore, send_window),
    MEMBER(StreamCore, _queued), MEMBER(StreamCore, _writer_blocked), MEMBER(StreamCore, _reading_paused),
    MEMBER(StreamCore, _unreturned), MEMBER(StreamCore, _finished), MEMBER(StreamCore, _sink),
    MEMBER(StreamCore, _debt), MEMBER(StreamCore, _threshold), {NULL}};
static PyMemberDef RelayCore_members[] = {
    MEMBER(RelayCore, a), MEMBER(RelayCore, b), MEMBER(RelayCore, _a_to_b), MEMBER(RelayCore, _b_to_a), {NULL}};
static PyMemberDef SessionCore_members[] = {MEMBER(SessionCore, tls), MEMBER(SessionCore, tunnel_blocked), {NULL}};

/* A core type: GC support over its fields (legs, relays and sessions refer to each other) and the members.
 * A subclass instance gets here from subtype_dealloc / subtype_traverse / subtype_clear, which handle
 * its __dict__; each of these walks only this core's own fields. */
#define CORE_TYPE(Name, Struct, Base, doc)                                                                 \
    static int Name##_traverse(PyObject *o, visitproc visit, void *arg) {                                 \
        return fields_traverse(o, CORE_COUNT(Struct), visit, arg);                                        \
    }                                                                                                      \
    static int Name##_clear(PyObject *o) { fields_clear(o, CORE_COUNT(Struct)); return 0; }                \
    static void Name##_dealloc(PyObject *o) {                                                              \
        PyObject_GC_UnTrack(o);                                                                            \
        fields_clear(o, CORE_COUNT(Struct));                                                               \
        Py_TYPE(o)->tp_free(o);                                                                            \
    }                                                                                                      \
    static PyTypeObject Name##Type = {                                                                     \
        PyVarObject_HEAD_INIT(NULL, 0)                                                                     \
        .tp_name = "agent.proxy._hotpath." #Name,                                                          \
        .tp_basicsize = sizeof(Struct),                                                                    \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,                         \
        .tp_doc = doc,                                                                                     \
        .tp_new = PyType_GenericNew,                                                                       \
        .tp_dealloc = Name##_dealloc,                                                                      \
        .tp_traverse = Name##_traverse,                                                                    \
        .tp_clear = Name##_clear,                                                                          \
        .tp_members = Name##_members,                                                                      \
        .tp_base = Base,                                                                                   \
    };

CORE_TYPE(LegCore, LegCore, NULL, "A relay leg's fields (agent.proxy.state.PyLegCore is the twin).")
static PyMemberDef PlainCore_members[] = {MEMBER(PlainCore, _fd), {NULL}};
CORE_TYPE(PlainCore, PlainCore, &LegCoreType, "A plain TCP leg's fields (agent.proxy.state.PyPlainCore).")
CORE_TYPE(TlsCore, TlsCore, &LegCoreType, "A TLS leg's fields (agent.proxy.state.PyTlsCore).")
CORE_TYPE(StreamCore, StreamCore, &LegCoreType, "A stream's flow-control fields (agent.proxy.state.PyStreamCore).")
CORE_TYPE(RelayCore, RelayCore, NULL, "A relay's legs and byte counts (agent.proxy.state.PyRelayCore).")
CORE_TYPE(SessionCore, SessionCore, NULL, "A tunnel session's fields (agent.proxy.state.PySessionCore).")

/* Field helpers: 0/1 or -1 with an exception (truth as Python's ``if``), an int field's value, and
 * ``field += delta`` (a new int object, as the interpreter makes). */
static int truth(PyObject *v) {
    if (v == Py_False || v == Py_None) return 0;
    if (v == Py_True) return 1;
    return PyObject_IsTrue(v);
}

static int int_field(PyObject *v, Py_ssize_t *out) {
    *out = PyLong_AsSsize_t(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int add_field(PyObject **field, Py_ssize_t delta) {
    Py_ssize_t value;
    if (int_field(*field, &value) < 0) return -1;
    PyObject *sum = PyLong_FromSsize_t(value + delta);
    if (sum == NULL) return -1;
    Py_SETREF(*field, sum);
    return 0;
}

static int call_method0(PyObject *o, PyObject *name) {
    PyObject *r = PyObject_VectorcallMethod(name, &o, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* ``transport`` takes writes (not None, not closing): 1, 0, or -1 with an exception. */
static int transport_open(PyObject *transport) {
    if (transport == NULL || transport == Py_None) return 0;
    PyObject *closing = PyObject_VectorcallMethod(s_is_closing, &transport, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (closing == NULL) return -1;
    int t = truth(closing);
    Py_DECREF(closing);
    return t < 0 ? -1 : !t;
}

#define IS(o, Core) ((o) != NULL && Py_TYPE(o)->tp_base == &Core##Type)

/* The relay ``leg`` hands its data to (Relay.leg_data: from a to b, anything else to a): the relay, the
 * leg on the other side and the direction's byte count (borrowed); 0 when the receiver is no Relay. */
static int relay_peer(LegCore *leg, RelayCore **relay, PyObject **peer, PyObject ***count) {
    PyObject *receiver = leg->receiver;
    if (!IS(receiver, RelayCore)) return 0;
    RelayCore *r = (RelayCore *)receiver;
    int from_a = r->a == (PyObject *)leg;
    *relay = r;
    *peer = from_a ? r->b : r->a;
    *count = from_a ? &r->_a_to_b : &r->_b_to_a;
    return *peer != NULL && **count != NULL;
}

/* ---------------------------------------------------------------------------------------------- */
/* The relay step tunnel → app: Stream.on_data → Relay.leg_data → PlainLeg.write                  */
/*
 * Taken inside receive() for a small DATA part (below ``small_view``: PlainLeg.write copies it) of a
 * Stream relayed to a PlainLeg. It first checks, changing nothing, that it is on the steady path (no
 * FIN seen, within the window ``window_limit``, the workload's socket not full, its transport open);
 * otherwise receive() calls Stream.on_data, which stays the reference, so DATA after FIN, a peer beyond
 * its window, a full socket and a closing transport keep their Python outcome. Then it makes the
 * Python steps' changes in their order and calls back into Python only for the rarer consequences
 * (Stream._settle while the socket is full, Stream._return_credit past the threshold).
 * Returns 1 done, 0 not taken, -1 error. */
static int stream_deliver(PyObject *stream, PyObject *part, Py_ssize_t window_limit, Py_ssize_t small_view) {
    if (!IS(stream, StreamCore) || !PyMemoryView_Check(part)) return 0;
    StreamCore *s = (StreamCore *)stream;
    Py_buffer *view = PyMemoryView_GET_BUFFER(part);
    Py_ssize_t n = view->len, unreturned, debt;
    if (n <= 0 || n >= small_view || !PyBuffer_IsContiguous(view, 'C')) return 0;
    if (!s->leg.peer_eof || !s->leg.bytes_read || !s->_unreturned || !s->_debt || !s->_reading_paused
        || !s->_threshold || !s->_sink)
        return 0; /* a field not set yet: Python raises what it raises */
    int t = truth(s->leg.peer_eof);
    if (t != 0) return t < 0 ? -1 : 0; /* DATA after FIN: on_data raises the protocol error */
    if (int_field(s->_unreturned, &unreturned) < 0 || int_field(s->_debt, &debt) < 0) return -1;
    unreturned += n;
    if (unreturned + debt > window_limit) return 0; /* beyond its window: on_data raises */
    if ((t = truth(s->_reading_paused)) != 0) return t < 0 ? -1 : 0;
    RelayCore *relay;
    PyObject *peer, **count;
    if (!relay_peer(&s->leg, &relay, &peer, &count) || !IS(peer, PlainCore)) return 0;
    LegCore *p = (LegCore *)peer;
    if (!p->bytes_written) return 0;
    PyObject *transport = p->transport;
    if ((t = transport_open(transport)) <= 0) return t;
    /* from here on the Python steps' changes, in their order; the objects are held across the calls out */
    Py_INCREF(relay); Py_INCREF(peer); Py_INCREF(transport);
    int rc = -1;
    PyObject *data = NULL;
    PyObject *owed = PyLong_FromSsize_t(unreturned);
    if (owed == NULL) goto done;
    Py_SETREF(s->_unreturned, owed);
    if (add_field(&s->leg.bytes_read, n) < 0 || add_field(count, n) < 0 || add_field(&p->bytes_written, n) < 0)
        goto done;
    data = PyBytes_FromStringAndSize(view->buf, n); /* the view's buffer is reused: the transport gets a copy */
    if (data == NULL) goto done;
    PyObject *call[2] = {transport, data};
    PyObject *written = PyObject_VectorcallMethod(str_write, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (written == NULL) goto done;
    Py_DECREF(written);
    /* the write may have filled the socket (pause_reading ran) or changed anything: read the fields again */
    if (s->_reading_paused && (t = truth(s->_reading_paused)) != 0) {
        if (t < 0) goto done;
        if (s->_sink != NULL && s->_sink != Py_None && call_method0(stream, s__settle) < 0) goto done;
    }
    Py_ssize_t threshold;
    if (s->_unreturned == NULL || s->_threshold == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a stream's credit fields were deleted during a relay step");
        goto done;
    }
    if (int_field(s->_unreturned, &unreturned) < 0 || int_field(s->_threshold, &threshold) < 0) goto done;
    if (unreturned >= threshold && call_method0(stream, s__return_credit) < 0) goto done;
    rc = 1;
done:
    Py_XDECREF(data);
    Py_DECREF(transport); Py_DECREF(peer); Py_DECREF(relay);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* The relay step app → tunnel: PlainLeg.buffer_updated → Relay.leg_data → Stream.write →        */
/* TlsLeg.write_data_frame                                                                         */

/* relay_send(leg, buffer, nbytes, small_write) -> bool: the first ``nbytes`` of ``buffer`` (the thread's
 * read buffer) that the PlainLeg ``leg`` just read, relayed to its Stream and sealed into the tunnel as one
 * DATA frame, when all of it goes now: a Relay between the leg and a Stream of a MuxSession over a TlsLeg,
 * the stream not ended, nothing queued, the whole message within its send window and below
 * ``small_write``, the tunnel's TLS started (or handed to the kernel: then the frame goes in plaintext and
 * ``_sealed`` counts it, as KernelTlsLeg.write_data_frame), its transport open and no close_notify sent. Otherwise
 * False with nothing changed, and PlainLeg.buffer_updated runs the Python steps (the reference). Errors
 * (an ssl.SSLError from sealing, whatever update_writer_blocked raises) propagate, as from the Python
 * steps. */
static PyObject *relay_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t n, small_write;
    if (nargs != 4 || (n = PyLong_AsSsize_t(args[2])) < 0 || (small_write = PyLong_AsSsize_t(args[3])) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "relay_send(leg, buffer, nbytes, small_write)");
        return NULL;
    }
    PyObject *leg = args[0];
    if (!IS(leg, PlainCore) || n == 0 || n >= small_write || !PyMemoryView_Check(args[1])) Py_RETURN_FALSE;
    Py_buffer *in = PyMemoryView_GET_BUFFER(args[1]);
    if (n > in->len || !PyBuffer_IsContiguous(in, 'C')) Py_RETURN_FALSE;
    LegCore *l = (LegCore *)leg;
    RelayCore *relay;
    PyObject *peer, **count;
    if (!l->bytes_read || !relay_peer(l, &relay, &peer, &count) || !IS(peer, StreamCore)) Py_RETURN_FALSE;
    StreamCore *s = (StreamCore *)peer;
    if (!s->leg.eof_sent || !s->leg.bytes_written || !s->_finished || !s->_queued || !s->send_window || !s->id
        || !s->_writer_blocked || !IS(s->session, SessionCore))
        Py_RETURN_FALSE;
    SessionCore *session = (SessionCore *)s->session;
    if (!session->tunnel_blocked || !IS(session->tls, TlsCore)) Py_RETURN_FALSE;
    TlsCore *tls = (TlsCore *)session->tls;
    if (!tls->_sslobj || !tls->_outgoing || !tls->leg.eof_sent || !tls->leg.bytes_written) Py_RETURN_FALSE;
    /* a kernel TLS leg (agent/proxy/kernel_leg.py KernelTlsLeg: no SSL object, no BIO) takes the frame in plaintext */
    int kernel = tls->_sslobj == Py_None && tls->_outgoing == Py_None;
    if (tls->_sslobj == Py_None && !kernel) Py_RETURN_FALSE;
    int t;
    Py_ssize_t window;
    unsigned long id = PyLong_AsUnsignedLong(s->id);
    if (id == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if ((t = truth(s->leg.eof_sent)) != 0 || (t = truth(s->_finished)) != 0 || (t = truth(s->_queued)) != 0
        || (t = truth(tls->leg.eof_sent)) != 0)
        return t < 0 ? NULL : Py_NewRef(Py_False);
    if (int_field(s->send_window, &window) < 0) return NULL;
    if (n > window) Py_RETURN_FALSE;
    PyObject *transport = tls->leg.transport;
    if ((t = transport_open(transport)) <= 0) return t < 0 ? NULL : Py_NewRef(Py_False);
    /* from here on the Python steps' changes, in their order; the objects are held across the calls out */
    Py_INCREF(relay); Py_INCREF(s); Py_INCREF(session); Py_INCREF(tls); Py_INCREF(transport);
    PyObject *result = NULL, *records = NULL;
    if (add_field(&l->bytes_read, n) < 0 || add_field(count, n) < 0 || add_field(&s->leg.bytes_written, n) < 0
        || add_field(&s->send_window, -n) < 0 || add_field(&tls->leg.bytes_written, HEADER_SIZE + n) < 0)
        goto done;
    records = kernel ? data_frame(id, in->buf, n) : seal_frame(tls->_sslobj, tls->_outgoing, id, in->buf, n);
    if (records == NULL) goto done;
    if (!PyBytes_Check(records) || PyBytes_GET_SIZE(records) > 0) { /* write_data_frame: ``if records`` */
        PyObject *call[2] = {transport, records};
        PyObject *written = PyObject_VectorcallMethod(str_write, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (written == NULL) goto done;
        Py_DECREF(written);
    }
    if (kernel) { /* KernelTlsLeg.write_data_frame's last step: count what its key sealed (it retires the tunnel) */
        PyObject *counted = PyObject_CallMethod((PyObject *)tls, "_sealed", "n", (Py_ssize_t)(HEADER_SIZE + n));
        if (counted == NULL) goto done;
        Py_DECREF(counted);
    }
    /* Stream.write's last step: tell the relay when the stream can take no more */
    if (s->send_window == NULL || s->_writer_blocked == NULL || session->tunnel_blocked == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a stream's window fields were deleted during a relay step");
        goto done;
    }
    if (int_field(s->send_window, &window) < 0) goto done;
    int blocked = window <= 0;
    if (!blocked && (blocked = truth(session->tunnel_blocked)) == 0) blocked = truth(s->_writer_blocked);
    if (blocked < 0 || (blocked && call_method0((PyObject *)s, s_update_writer_blocked) < 0)) goto done;
    result = Py_NewRef(Py_True);
done:
    Py_XDECREF(records);
    Py_DECREF(transport); Py_DECREF(tls); Py_DECREF(session); Py_DECREF(s); Py_DECREF(relay);
    return result;
}

/* receive(leg, sslobj, incoming, data, buffer, decoder, streams, dispatch, window_limit, small_view) -> state:
 * one tunnel read (sslobj None: a kernel TLS leg's read, ``data`` is ``buffer`` and holds plaintext: nothing to
 * decrypt, state 0),
 * the compiled twin of TlsLeg.data_received → _decrypt_into → MuxSession.leg_data for an established
 * tunnel. ``data`` (bytes-like, or None to go on after a full buffer) is written to the incoming BIO;
 * plaintext is decrypted into ``buffer`` as decrypt() does and counted in ``leg.bytes_read``; the
 * frames in it (``decoder``: a FrameDecoder, feed_parts) are handed over in order, all of them decoded
 * before the first is handed over (as MuxSession.leg_data): a DATA part to ``streams[id].on_data(part)``
 * (dropped for a stream not in the dict), any other frame to ``dispatch(frame)``. Returns decrypt()'s
 * state (1: the buffer was full, call again with None). Errors propagate: ssl.SSLError from
 * decrypting, MuxProtocolError from decoding, whatever on_data or dispatch raise (frames after the
 * failing one are not handed over). */
static PyObject *receive(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t window_limit = -1, small_view = -1;
    if (nargs == 10) {
        window_limit = PyLong_AsSsize_t(args[8]);
        small_view = PyLong_AsSsize_t(args[9]);
        if ((window_limit == -1 || small_view == -1) && PyErr_Occurred()) return NULL;
    }
    if (nargs != 10 || !PyMemoryView_Check(args[4]) || !PyObject_TypeCheck(args[5], &DecoderType)
        || !PyDict_Check(args[6]) || window_limit < 0 || small_view < 0) {
        PyErr_SetString(PyExc_TypeError,
                        "receive(leg, sslobj, incoming, data, buffer: memoryview, decoder: FrameDecoder, "
                        "streams: dict, dispatch, window_limit: int >= 0, small_view: int >= 0)");
        return NULL;
    }
    if (!configured()) return NULL;
    PyObject *leg = args[0], *sslobj = args[1], *incoming = args[2], *buffer = args[4], *streams = args[6];
    PyObject *dispatch = args[7];
    Py_ssize_t filled = 0;
    int state = 0;
    if (sslobj == Py_None) { /* a kernel TLS leg: ``data`` is plaintext already, and is ``buffer`` */
        if (args[3] != buffer) {
            PyErr_SetString(PyExc_TypeError, "receive: without sslobj (kernel TLS) data must be the buffer");
            return NULL;
        }
        filled = PyMemoryView_GET_BUFFER(buffer)->len;
    } else {
        if (args[3] != Py_None) {
            PyObject *call[2] = {incoming, args[3]};
            PyObject *written = PyObject_VectorcallMethod(str_write, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            if (written == NULL) return NULL;
            Py_DECREF(written);
        }
        state = decrypt_loop(sslobj, incoming, buffer, &filled);
        if (state < 0) return NULL;
    }
    if (filled) {
        if (IS(leg, TlsCore) && ((LegCore *)leg)->bytes_read != NULL) { /* TlsLeg: the field itself */
            if (add_field(&((LegCore *)leg)->bytes_read, filled) < 0) return NULL;
        } else {
            PyObject *count = PyObject_GetAttr(leg, str_bytes_read);
            if (count == NULL) return NULL;
            PyObject *n = PyLong_FromSsize_t(filled);
            PyObject *sum = n != NULL ? PyNumber_Add(count, n) : NULL;
            Py_DECREF(count);
            Py_XDECREF(n);
            if (sum == NULL) return NULL;
            int rc = PyObject_SetAttr(leg, str_bytes_read, sum);
            Py_DECREF(sum);
            if (rc < 0) return NULL;
        }
        PyObject *plain = view_slice(buffer, 0, filled);
        if (plain == NULL) return NULL;
        PyObject *frames = Decoder_feed_parts((Decoder *)args[5], plain);
        Py_DECREF(plain);
        if (frames == NULL) return NULL;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(frames); i++) {
            PyObject *frame = PyList_GET_ITEM(frames, i);
            PyObject *result;
            if (PyTuple_GET_ITEM(frame, 0) == kinds[KIND_DATA]) {
                PyObject *stream = PyDict_GetItemWithError(streams, PyTuple_GET_ITEM(frame, 1));
                if (stream == NULL) {
                    if (PyErr_Occurred()) { Py_DECREF(frames); return NULL; }
                    continue; /* data for a stream just reset: dropped */
                }
                Py_INCREF(stream);
                int done = stream_deliver(stream, PyTuple_GET_ITEM(frame, 2), window_limit, small_view);
                if (done < 0) {
                    result = NULL;
                } else if (done) {
                    result = Py_None;
                    Py_INCREF(result);
                } else {
                    PyObject *call[2] = {stream, PyTuple_GET_ITEM(frame, 2)};
                    result = PyObject_VectorcallMethod(str_on_data, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
                }
                Py_DECREF(stream);
            } else {
                result = PyObject_CallOneArg(dispatch, frame);
            }
            if (result == NULL) { Py_DECREF(frames); return NULL; }
            Py_DECREF(result);
        }
        Py_DECREF(frames);
    }
    return PyLong_FromLong(state);
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(Frame, frame_types, MuxProtocolError, SSLWantReadError, SSLZeroReturnError, MAX_FRAME, "
     "MAX_CONTROL_PAYLOAD)"},
    {"seal_data", (PyCFunction)(void (*)(void))seal_data, METH_FASTCALL,
     "seal_data(sslobj, outgoing, stream, data) -> bytes of TLS records carrying one DATA frame"},
    {"decrypt", (PyCFunction)(void (*)(void))decrypt, METH_FASTCALL,
     "decrypt(sslobj, incoming, buffer, filled) -> (filled, state): 0 drained, 1 buffer full, 2 end of stream"},
    {"receive", (PyCFunction)(void (*)(void))receive, METH_FASTCALL,
     "receive(leg, sslobj, incoming, data, buffer, decoder, streams, dispatch, window_limit, small_view) -> state: "
     "one tunnel read decrypted, counted, decoded and handed to the streams (a small DATA part relayed to a "
     "plain leg here)"},
    {"relay_send", (PyCFunction)(void (*)(void))relay_send, METH_FASTCALL,
     "relay_send(leg, buffer, nbytes, small_write) -> bool: a plain leg's read relayed to its stream and sealed "
     "into the tunnel, when all of it goes now (False: nothing changed, run the Python steps)"},
    {NULL}
};

/* What agent/proxy/hotpath.py expects (its ABI): raise both together whenever a function, its arguments
   or its results change, so a module built from older source is refused instead of called wrongly. */
#define HOTPATH_ABI 5

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "agent.proxy._hotpath",
    "Compiled twin of the tunnel's per-message work (see agent/proxy/hotpath.py).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__hotpath(void) {
    if (PyType_Ready(&DecoderType) < 0) return NULL;
    PyTypeObject *cores[] = {&LegCoreType, &PlainCoreType, &TlsCoreType, &StreamCoreType, &RelayCoreType,
                             &SessionCoreType};
    for (size_t i = 0; i < sizeof cores / sizeof cores[0]; i++)
        if (PyType_Ready(cores[i]) < 0) return NULL;
    str_read = PyUnicode_InternFromString("read");
    str_write = PyUnicode_InternFromString("write");
    str_pending = PyUnicode_InternFromString("pending");
    str_on_data = PyUnicode_InternFromString("on_data");
    str_bytes_read = PyUnicode_InternFromString("bytes_read");
    if (str_read == NULL || str_write == NULL || str_pending == NULL || str_on_data == NULL || str_bytes_read == NULL)
        return NULL;
#define INTERN_NAME(n) if ((s_##n = PyUnicode_InternFromString(#n)) == NULL) return NULL;
    LEG_NAMES(INTERN_NAME)
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "ABI", HOTPATH_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddType(m, &DecoderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < sizeof cores / sizeof cores[0]; i++) {
        if (PyModule_AddType(m, cores[i]) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
