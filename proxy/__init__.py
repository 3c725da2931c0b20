"""The XPUB/XSUB proxy: live pub/sub, and the capture pipe to the writer."""
