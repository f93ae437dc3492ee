"""Grow by 16 MB at a time (each step small, the total unbounded)."""
chunks = []
while True:
    chunks.append(bytearray(16 << 20))
