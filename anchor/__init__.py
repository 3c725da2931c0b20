"""The anchor worker: reserves wallet UTXOs through the writer and anchors
document hashes (RFC 6962 Merkle roots) in OP_RETURN transactions with bitcoind."""
