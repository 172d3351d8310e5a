"""A mount namespace of the test's own, where a small tmpfs stands in for a full disk."""

import shutil
import subprocess


def private_mount_command():
    """A command prefix that runs its command in a mount namespace of its own, where
    mounting a tmpfs is allowed; None where this machine has none."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):
        command = [unshare] + flags + ["--propagation", "private"]
        probe = subprocess.run(command + ["sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                               capture_output=True)
        if probe.returncode == 0:
            return command
    return None
