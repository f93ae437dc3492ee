"""Allocate 20 GB at once."""
x = bytearray(20 << 30)
print("allocated")
