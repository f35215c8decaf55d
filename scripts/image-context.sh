#!/usr/bin/env bash
# Checks, without Docker, that deploy/Dockerfile's builder stage gets a workspace cargo can load:
# it assembles in .run/image-context/ what deploy/Dockerfile.dockerignore lets into the build
# context (of the files git tracks) and the builder stage's COPY lines take from it, then has
# cargo resolve the workspace there with `--locked`, as `cargo build --locked` in the image
# would start (`cargo tree` for this machine's target: it reads only the packages that target
# builds, all fetched by then).
# A workspace member the Dockerfile does not copy (tests/e2e once was) fails here instead of in
# `docker build`, which the tests cannot run (no engine on the CI machines).
#
# Offline: run it after a build of the workspace has fetched the dependencies (scripts/test.sh
# runs it after cargo nextest).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

OUT="$RUN/image-context"
rm -rf "$OUT" "$OUT.files"
mkdir -p "$OUT"

# Docker's rules, as far as our two files use them: .dockerignore patterns in order, the last one
# matching a path (or a folder above it) decides, `!` lets back in, `**` spans folders; COPY
# sources are paths or globs relative to the context, copied under the same relative path.
git ls-files -z > "$OUT.files"
python3 - "$OUT" "$OUT.files" <<'PY' || die "deploy/Dockerfile's build context could not be assembled (above)"
import fnmatch, os, re, shutil, sys

out, listing = sys.argv[1], sys.argv[2]
files = [f for f in open(listing).read().split("\0") if f]

def pattern_regex(pattern):
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
    table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(table.get(p, re.escape(p)) for p in parts) + "$")

rules = []
for line in open("deploy/Dockerfile.dockerignore"):
    line = line.strip()
    if line and not line.startswith("#"):
        keep = line.startswith("!")
        rules.append((keep, pattern_regex(line.lstrip("!"))))

def in_context(path):
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for keep, regex in rules:
        if any(regex.match(p) for p in prefixes):
            included = keep
    return included

context = [f for f in files if in_context(f)]

copies, stage = [], 0
for line in open("deploy/Dockerfile"):
    if line.startswith("FROM "):
        stage += 1
    words = line.split()
    if stage == 1 and words and words[0] == "COPY" and not any(w.startswith("--") for w in words):
        *sources, dest = words[1:]
        for source in sources:
            if dest not in ("./", source):
                sys.exit(f"COPY {source} {dest}: this check copies to the same relative path only; extend it")
            copies.append(source.rstrip("/"))
if not copies:
    sys.exit("no COPY lines found in deploy/Dockerfile's builder stage")

copied = 0
for f in context:
    if any(fnmatch.fnmatchcase(f, c) or f.startswith(c + "/") for c in copies):
        os.makedirs(os.path.join(out, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(f, os.path.join(out, f))
        copied += 1
print(f"{copied} of {len(files)} tracked files reach the builder stage", file=sys.stderr)
PY

target="$(rustc -vV | sed -n 's/^host: //p')"
cargo tree --locked --offline --workspace --depth 0 --target "$target" \
  --manifest-path "$OUT/Cargo.toml" >/dev/null \
  || die "the Dockerfile's builder stage would not load the workspace (above): copy what it needs
in deploy/Dockerfile and let it into the context in deploy/Dockerfile.dockerignore"
