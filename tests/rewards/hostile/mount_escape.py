"""Classic container escapes: mount a filesystem, remount / writable, chroot, unmount /usr."""
import ctypes
import json

libc = ctypes.CDLL(None, use_errno=True)
out = {}
for name, call in (("mount tmpfs", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
                   ("remount / rw", lambda: libc.mount(None, b"/", None, 32, None)),  # MS_REMOUNT without MS_RDONLY
                   ("mount proc", lambda: libc.mount(b"proc", b"/tmp", b"proc", 0, None)),
                   ("chroot", lambda: libc.chroot(b"/tmp")),
                   ("umount /usr", lambda: libc.umount2(b"/usr", 2))):  # MNT_DETACH
    rc = call()
    out[name] = [rc, ctypes.get_errno()]
print(json.dumps(out))
