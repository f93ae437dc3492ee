"""Fork forever, each child in a new session (out of the process group)."""
import os

while True:
    try:
        if os.fork() == 0:
            os.setsid()
    except OSError:
        pass
