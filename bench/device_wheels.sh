#!/usr/bin/env bash
# Fetch, on this machine, the wheels that bench/device.sh installs on a GPU machine that cannot reach
# a package index: this environment's versions of everything `rlhf-cli[bench]` needs, built for that
# machine's Python (3.12, x86-64 Linux), except the packages its image already holds (KEPT below:
# torch and the CUDA stack, and the large compiled libraries). Packages published only as source
# (antlr4-python3-runtime, deepspeed) are built into pure-Python wheels here.
#
#   bash bench/device_wheels.sh            # into .whl/ (git-ignored); then carry .whl to the device
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
KEPT='torch|numpy|pandas|pyarrow|matplotlib|contourpy|kiwisolver|fonttools|pillow|sympy|mpmath|networkx|setuptools|regex|pyyaml|markupsafe|psutil|msgpack|xxhash|ninja|hf-xet|python-dateutil|pyparsing|cycler|six|rlhf-cli'

rm -rf "$DEST" && mkdir -p "$DEST"
# The dependency closure of rlhf-cli[bench] as installed here, pinned to the versions here.
pins=$("$PYTHON" - <<'PY'
import importlib.metadata as metadata
import re

from packaging.requirements import Requirement

def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()

found, todo = {}, [("rlhf-cli", {"bench"})]
while todo:
    name, extras = todo.pop()
    if key(name) in found:
        continue
    dist = metadata.distribution(name)
    found[key(name)] = dist.version.split("+")[0]
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {""} | extras):
            todo.append((req.name, set(req.extras)))
print("\n".join(f"{name}=={version}" for name, version in sorted(found.items())))
PY
)
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for pin in $(grep -Ev "^($KEPT)==" <<<"$pins"); do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
      --platform manylinux2014_x86_64 "${platforms[@]}" -d "$DEST" "$pin" 2>/dev/null \
    || "$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$pin"
done
ls "$DEST" | sed 's/^/  /'
du -sh "$DEST"
