"""Anchor worker: reserves wallet UTXOs through the writer and anchors document
hashes with bitcoind. Built in its own issue; nothing here runs yet."""
