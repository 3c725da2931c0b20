"""Merkle trees (RFC 6962) and the anchoring proof format: pure functions over
bytes that import nothing but hashlib, so that the writer, the reader, the
anchor worker and any client can use them without reaching each other's code."""
