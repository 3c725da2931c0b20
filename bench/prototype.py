"""The bare baseline the bus is measured against (not part of the bus).

zmq.proxy with its capture into a PULL loop that stores (topic, payload) with
the stdlib sqlite3 module, 1,000 rows per executemany/transaction. No
validation, no meta, no metrics, no shutdown handling.
Usage: python bench/prototype.py PUB_ENDPOINT SUB_ENDPOINT DB_PATH
"""
import sqlite3
import sys
import threading

import zmq

pub_endpoint, sub_endpoint, db_path = sys.argv[1:4]
ctx = zmq.Context()
xsub = ctx.socket(zmq.XSUB)
xsub.bind(pub_endpoint)
xsub.send(b"\x01")
xpub = ctx.socket(zmq.XPUB)
xpub.bind(sub_endpoint)
push = ctx.socket(zmq.PUSH)
push.bind("inproc://capture")
pull = ctx.socket(zmq.PULL)
pull.connect("inproc://capture")
threading.Thread(target=zmq.proxy, args=(xsub, xpub, push), daemon=True).start()

db = sqlite3.connect(db_path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=NORMAL")
db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, topic TEXT, payload BLOB)")
rows = []
while True:
    if pull.poll(50):
        frames = pull.recv_multipart()
        if len(frames) >= 2:
            rows.append((frames[0].decode(), frames[1]))
        if len(rows) < 1000:
            continue
    if rows:
        db.execute("BEGIN")
        db.executemany("INSERT INTO messages (topic, payload) VALUES (?, ?)", rows)
        db.execute("COMMIT")
        rows = []
