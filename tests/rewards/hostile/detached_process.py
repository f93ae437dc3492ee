"""Leave a daemon behind: double fork, setsid, and keep running after the program exits."""
import json
import os
import time

if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.closerange(0, 3)
        time.sleep(30)
        os._exit(0)
    os._exit(0)
time.sleep(0.2)
print(json.dumps({"left": True}))
