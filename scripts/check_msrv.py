"""Check that the workspace's `rust-version` is at least every dependency's declared one.

Reads `cargo metadata` (offline: the lock file's packages are already fetched by the build).
Exits 1 naming the dependencies that need a newer Rust than the workspace declares.
"""
import json
import subprocess
import sys


def version(v):
    return tuple(int(x) for x in v.split("."))[:2]


meta = json.loads(subprocess.check_output(["cargo", "metadata", "--format-version", "1", "--offline"]))
ours = {p["id"] for p in meta["packages"] if p["id"] in set(meta["workspace_members"])}
declared = {p["rust_version"] for p in meta["packages"] if p["id"] in ours}
if len(declared) != 1 or None in declared:
    sys.exit(f"workspace members declare rust-version {declared}; expected one value")
msrv = version(declared.pop())
newer = sorted(
    (version(p["rust_version"]), p["name"], p["version"])
    for p in meta["packages"]
    if p["id"] not in ours and p.get("rust_version") and version(p["rust_version"]) > msrv
)
if newer:
    sys.exit("rust-version %s is too old for: %s" % (".".join(map(str, msrv)), ", ".join(f"{n} {v} (needs {'.'.join(map(str, r))})" for r, n, v in newer)))
need = max((version(p["rust_version"]) for p in meta["packages"] if p.get("rust_version")), default=msrv)
print("rust-version %s: the newest any dependency asks for is %s" % (".".join(map(str, msrv)), ".".join(map(str, need))))
