"""The parity check: every distributed layout against a single-process plain-PyTorch reference."""
