"""40 x 15 MB files in /dev/shm (each under the 16 MB file limit), meant to outlive the call."""
import json

p = json.load(open("params.json"))
written, err = 0, None
for i in range(40):
    try:
        with open(f"/dev/shm/pwned-{p['nonce']}-{i}", "wb") as f:
            f.write(b"x" * (15 << 20))
        written += 15 << 20
    except OSError as e:
        err = e.errno
        break
print(json.dumps({"written": written, "errno": err}))
