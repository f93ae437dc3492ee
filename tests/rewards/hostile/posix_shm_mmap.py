"""POSIX shared memory (multiprocessing.shared_memory), mapped and filled: 40 x 15 MB."""
import json
import os
from multiprocessing import shared_memory

p = json.load(open("params.json"))
pid = os.fork()
if pid == 0:
    blocks = []
    for i in range(40):
        shm = shared_memory.SharedMemory(name=f"pwned-{p['nonce']}-{i}", create=True, size=15 << 20)
        shm.buf[:] = b"x" * (15 << 20)  # the tmpfs runs out of pages: SIGBUS
        blocks.append(shm)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print(json.dumps({"child": os.waitstatus_to_exitcode(status)}))
