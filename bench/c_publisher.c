/* An acknowledged publisher in C for bench/peers.py (not a test): the same
   protocol as the publisher example in docs/protocol.md, sending as fast as
   the window allows. It opens a producer session, sends COUNT messages of
   SIZE bytes to bench.c (meta {producer, epoch, seq, mac}, each signed),
   keeps at most WINDOW unacknowledged, checks every acknowledgement's mac,
   and prints {"rate": msg/s} once the last seq is acknowledged: the COUNT - 1
   messages after the first, from the first's acknowledgement (its
   subscription is live then) to the last's.

   Endpoints from BUS_PUB_ENDPOINT, BUS_CONTROL_ENDPOINT, BUS_NOTIFY_ENDPOINT.
   gcc -O2 -o c_publisher c_publisher.c -lzmq -lmsgpackc -lsodium
   Usage: c_publisher COUNT SIZE WINDOW */
#include <zmq.h>
#include <msgpack.h>
#include <sodium.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *env(const char *name) {
    const char *value = getenv(name);
    if (!value) {
        fprintf(stderr, "%s is not set\n", name);
        exit(2);
    }
    return value;
}

static void pack_str(msgpack_packer *pk, const char *s) {
    msgpack_pack_str_with_body(pk, s, strlen(s));
}

static msgpack_object *lookup(msgpack_object *map, const char *key) {
    if (map->type != MSGPACK_OBJECT_MAP) return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(key)
            && memcmp(k->via.str.ptr, key, k->via.str.size) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

static void put_be(unsigned char *out, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; i--, v >>= 8) out[i] = (unsigned char)v;
}

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct sender {
    void *sock;
    const char *topic;
    const unsigned char *payload;
    size_t size;
    const char *producer;
    uint64_t epoch;
    msgpack_packer *pk;
    msgpack_sbuffer *buf;
    crypto_generichash_state keyed;         /* the header, topic and payload hashed once */
};

/* Message `seq`: meta {producer, epoch, seq, mac}, its mac over the message. */
static void send_one(struct sender *s, uint64_t seq) {
    static const unsigned char zeros[16];
    msgpack_sbuffer_clear(s->buf);
    msgpack_pack_map(s->pk, 4);
    pack_str(s->pk, "producer"); pack_str(s->pk, s->producer);
    pack_str(s->pk, "epoch"); msgpack_pack_uint64(s->pk, s->epoch);
    pack_str(s->pk, "seq"); msgpack_pack_uint64(s->pk, seq);
    pack_str(s->pk, "mac"); msgpack_pack_bin_with_body(s->pk, zeros, sizeof zeros);
    crypto_generichash_state st = s->keyed;
    unsigned char *meta = (unsigned char *)s->buf->data;
    crypto_generichash_update(&st, meta, s->buf->size - 16);
    crypto_generichash_final(&st, meta + s->buf->size - 16, 16);
    zmq_send(s->sock, s->topic, strlen(s->topic), ZMQ_SNDMORE);
    zmq_send(s->sock, s->payload, s->size, ZMQ_SNDMORE);
    zmq_send(s->sock, s->buf->data, s->buf->size, 0);
}

struct acks {
    void *sock;
    const unsigned char *key;
    uint64_t epoch, acked;                  /* acked: the highest contiguous seq */
};

/* Read the acknowledgements waiting (the first with `flags`: 0 waits up to
   the socket's RCVTIMEO), keeping only authentic ones of this epoch up to
   `sent`. -1 if none came. */
static int read_acks(struct acks *a, uint64_t sent, int flags) {
    static const unsigned char mac_entry[6] = {0xa3, 'm', 'a', 'c', 0xc4, 0x10};
    int read = -1, more = 0;
    size_t more_size = sizeof more;
    for (;; flags = ZMQ_DONTWAIT) {
        char t[128];
        unsigned char note[1024], nh[5] = {'N'}, tag[16];
        int tn = zmq_recv(a->sock, t, sizeof t, flags);
        if (tn < 0) return read;
        read = 0;
        zmq_getsockopt(a->sock, ZMQ_RCVMORE, &more, &more_size);
        int len = more ? zmq_recv(a->sock, note, sizeof note, 0) : -1;
        if (tn > (int)sizeof t || len < 22 || len > (int)sizeof note
            || memcmp(note + len - 22, mac_entry, 6) != 0) continue;
        put_be(nh + 1, tn, 4);
        crypto_generichash_state st;
        crypto_generichash_init(&st, a->key, 32, 16);
        crypto_generichash_update(&st, nh, sizeof nh);
        crypto_generichash_update(&st, (unsigned char *)t, tn);
        crypto_generichash_update(&st, note, len - 16);
        crypto_generichash_final(&st, tag, 16);
        if (sodium_memcmp(tag, note + len - 16, 16) != 0) continue;
        msgpack_unpacked msg;
        msgpack_unpacked_init(&msg);
        if (msgpack_unpack_next(&msg, (const char *)note, len, NULL) == MSGPACK_UNPACK_SUCCESS) {
            msgpack_object *e = lookup(&msg.data, "epoch");
            msgpack_object *q = lookup(&msg.data, "contiguous_seq");
            if (e && q && e->type == MSGPACK_OBJECT_POSITIVE_INTEGER
                && q->type == MSGPACK_OBJECT_POSITIVE_INTEGER && e->via.u64 == a->epoch
                && q->via.u64 > a->acked && q->via.u64 <= sent)
                a->acked = q->via.u64;
        }
        msgpack_unpacked_destroy(&msg);
    }
}

int main(int argc, char **argv) {
    if (argc != 4 || sodium_init() < 0) {
        fprintf(stderr, "usage: c_publisher COUNT SIZE WINDOW\n");
        return 2;
    }
    uint64_t count = strtoull(argv[1], NULL, 10), window = strtoull(argv[3], NULL, 10);
    size_t size = strtoul(argv[2], NULL, 10);
    if (!count) return 2;
    void *ctx = zmq_ctx_new();
    char producer[64], ack_topic[80];
    snprintf(producer, sizeof producer, "c-bench-%d", (int)getpid());
    snprintf(ack_topic, sizeof ack_topic, "$bus.ack.%s", producer);
    void *notes = zmq_socket(ctx, ZMQ_SUB);
    zmq_setsockopt(notes, ZMQ_SUBSCRIBE, ack_topic, strlen(ack_topic));
    zmq_connect(notes, env("BUS_NOTIFY_ENDPOINT"));

    /* producer_open */
    void *req = zmq_socket(ctx, ZMQ_REQ);
    int timeout = 5000, linger = 0;
    zmq_setsockopt(req, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(req, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(req, env("BUS_CONTROL_ENDPOINT"));
    msgpack_sbuffer buf;
    msgpack_packer pk;
    msgpack_sbuffer_init(&buf);
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 3);
    pack_str(&pk, "id"); msgpack_pack_int(&pk, 1);
    pack_str(&pk, "cmd"); pack_str(&pk, "producer_open");
    pack_str(&pk, "args"); msgpack_pack_map(&pk, 1);
    pack_str(&pk, "producer"); pack_str(&pk, producer);
    zmq_send(req, buf.data, buf.size, 0);
    char reply[1024];
    int n = zmq_recv(req, reply, sizeof reply, 0);
    zmq_close(req);
    if (n < 0 || n > (int)sizeof reply) {
        fprintf(stderr, "producer_open: no reply\n");
        return 1;
    }
    uint64_t epoch = 0, first = 0;
    unsigned char key[32];
    msgpack_unpacked msg;
    msgpack_unpacked_init(&msg);
    int opened = 0;
    if (msgpack_unpack_next(&msg, reply, n, NULL) == MSGPACK_UNPACK_SUCCESS) {
        msgpack_object *result = lookup(&msg.data, "result");
        msgpack_object *e = result ? lookup(result, "epoch") : NULL;
        msgpack_object *q = result ? lookup(result, "next_seq") : NULL;
        msgpack_object *k = result ? lookup(result, "session_key") : NULL;
        if (e && q && k && k->type == MSGPACK_OBJECT_BIN && k->via.bin.size == 32) {
            epoch = e->via.u64;
            first = q->via.u64;
            memcpy(key, k->via.bin.ptr, 32);
            opened = 1;
        }
    }
    msgpack_unpacked_destroy(&msg);
    if (!opened) {
        fprintf(stderr, "producer_open: refused\n");
        return 1;
    }

    void *pub = zmq_socket(ctx, ZMQ_XPUB);
    int one = 1, hwm = 100000;
    zmq_setsockopt(pub, ZMQ_XPUB_NODROP, &one, sizeof one);
    zmq_setsockopt(pub, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(pub, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    zmq_connect(pub, env("BUS_PUB_ENDPOINT"));
    const char *topic = "bench.c";
    for (;;) {
        char sub[256];
        int got = zmq_recv(pub, sub, sizeof sub, 0);
        if (got < 0) {
            fprintf(stderr, "the proxy did not subscribe\n");
            return 1;
        }
        if (got == 2 && sub[0] == 1 && sub[1] == topic[0]) break;
    }
    unsigned char *payload = malloc(size ? size : 1);
    randombytes_buf(payload, size);
    struct sender out = {pub, topic, payload, size, producer, epoch, &pk, &buf};
    unsigned char header[9] = {'M'};
    put_be(header + 1, strlen(topic), 4);
    put_be(header + 5, size, 4);
    crypto_generichash_init(&out.keyed, key, sizeof key, 16);
    crypto_generichash_update(&out.keyed, header, sizeof header);
    crypto_generichash_update(&out.keyed, (const unsigned char *)topic, strlen(topic));
    crypto_generichash_update(&out.keyed, payload, size);
    struct acks acks = {notes, key, epoch, first - 1};
    /* The acknowledgement subscription is live once a first message is
       acknowledged (a SUB's subscription travels on its own): the first
       message is sent again each second until it is (the writer stores it
       once), and the clock starts then, as the Python publisher's connect()
       waits for its subscription before it is timed. */
    int second = 1000;
    zmq_setsockopt(notes, ZMQ_RCVTIMEO, &second, sizeof second);
    for (int tries = 0; acks.acked < first; tries++) {
        if (tries == 10) {
            fprintf(stderr, "no acknowledgement in 10 s\n");
            return 1;
        }
        send_one(&out, first);
        read_acks(&acks, first, 0);
    }
    double started = seconds();
    uint64_t last = first + count - 1, sent = first;
    while (acks.acked < last) {
        while (sent < last && sent - acks.acked < window) {
            send_one(&out, ++sent);
            if (!(sent & 0xff)) break;      /* read acknowledgements now and then */
        }
        int full = sent - acks.acked >= window || sent == last;
        if (read_acks(&acks, sent, full ? 0 : ZMQ_DONTWAIT) < 0 && full) {
            fprintf(stderr, "no acknowledgement for 1 s at seq %llu\n",
                    (unsigned long long)acks.acked);
            return 1;
        }
    }
    double elapsed = seconds() - started;
    printf("{\"rate\": %.1f}\n", (double)(count - 1) / elapsed);
    zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(notes, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(pub);
    zmq_close(notes);
    msgpack_sbuffer_destroy(&buf);
    free(payload);
    zmq_ctx_term(ctx);
    return 0;
}
