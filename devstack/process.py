"""Running commands as the unprivileged service user when we are root.

PostgreSQL refuses to run as root, and ``make up`` must work both as root and as a normal user.
"""

import os
import pwd
import shutil
import subprocess
from pathlib import Path


def is_root() -> bool:
    return os.geteuid() == 0


def run_as(user: str | None, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``args`` as ``user`` when root (else as ourselves), raising with its output on failure."""
    if is_root() and user:
        kwargs.setdefault("user", user)
        kwargs.setdefault("group", pwd.getpwnam(user).pw_gid)
        kwargs.setdefault("extra_groups", [])
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def make_owned_dir(path: Path, user: str | None, mode: int = 0o700) -> Path:
    """Create ``path`` owned by ``user`` (when root) with ``mode``; parents stay traversable."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if is_root() and user:
        shutil.chown(path, user, pwd.getpwnam(user).pw_gid)
    return path


def write_private(path: Path, text: str, user: str | None = None) -> None:
    """Write a secret file readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if is_root() and user:
        shutil.chown(path, user, pwd.getpwnam(user).pw_gid)
