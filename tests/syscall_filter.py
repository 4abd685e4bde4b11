"""Run a command under the system call filter a systemd unit file declares, without systemd.

    python tests/syscall_filter.py UNIT [--strict] -- COMMAND [ARG...]

Reads the unit's `SystemCallFilter=` lines (allow-list, then `~` removals, as systemd combines them),
expands the groups with `systemd-analyze syscall-filter`, loads the filter with libseccomp (native
architecture only, as `SystemCallArchitectures=native`) and execs COMMAND. A call outside the filter
fails with the unit's `SystemCallErrorNumber=` (or kills the process, as systemd does without it);
`--strict` kills the process on any call outside the filter, so a run that survives never made one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000


def unit_values(unit: Path, key: str) -> list[str]:
    """Every value of `key=` in the unit's [Service] section, in order."""
    values, section = [], ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.startswith(f"{key}="):
            values.append(line.split("=", 1)[1])
    return values


def syscall_groups() -> dict[str, list[str]]:
    """systemd's named groups (`@system-service`...) with their members, as this systemd defines them."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.strip():
            current = None
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        calls |= expand(groups[name], groups) if name.startswith("@") else {name}
    return calls


def allowed_calls(unit: Path) -> set[str]:
    """The system calls the unit allows: systemd adds @default to an allow-list, `~` lines remove."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for value in unit_values(unit, "SystemCallFilter"):
        if value.startswith("~"):
            allowed -= expand(value[1:].split(), groups)
        else:
            allowed |= expand(["@default", *value.split()], groups)
    if not allowed:
        raise SystemExit(f"{unit}: no SystemCallFilter= allow-list")
    return allowed


def load_filter(allowed: set[str], default_action: int) -> None:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(default_action)
    for name in sorted(allowed):
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:  # names of other architectures do not resolve here
            if lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 0) < 0:
                raise SystemExit(f"seccomp_rule_add({name}) failed")
    if lib.seccomp_load(ctx) < 0:
        raise SystemExit("seccomp_load failed")


def main(argv: list[str]) -> None:
    if "--" not in argv or not argv[0:1]:
        raise SystemExit(__doc__)
    split = argv.index("--")
    unit, strict, command = Path(argv[0]), "--strict" in argv[1:split], argv[split + 1:]
    error_number = unit_values(unit, "SystemCallErrorNumber")
    action = SCMP_ACT_KILL_PROCESS
    if error_number and not strict:
        action = SCMP_ACT_ERRNO | getattr(errno, error_number[-1])
    load_filter(allowed_calls(unit), action)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
