"""UDP datagrams to the host through raw libc: no connection to refuse."""
import ctypes
import json
import socket

p = json.load(open("params.json"))
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for host in p["hosts"]:
    fd = libc.socket(2, 2, 0)  # AF_INET, SOCK_DGRAM
    addr = (2).to_bytes(2, "little") + p["port"].to_bytes(2, "big") + socket.inet_aton(host) + bytes(8)
    sent = libc.sendto(fd, b"leak", 4, 0, addr, 16)
    out[host] = [sent, ctypes.get_errno()]
    libc.close(fd)
print(json.dumps(out))
