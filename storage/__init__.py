"""The database, for every process that uses it: schema, connections, row
shapes and queries, one module per concern (messages and history, producer
sessions and consumer positions, UTXOs, anchors, retention). The writer and the
reader import this package and the bus kernel only; no SQL lives elsewhere."""
