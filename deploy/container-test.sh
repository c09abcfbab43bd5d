#!/usr/bin/env bash
# The container tier of CI (`make container-test`, called by .ci/run after `make test`):
# build the real Dockerfile on a locally made base image, run the image, then bring up the
# compose stack (proxy, Prometheus, Alertmanager; Grafana cannot be had here) with the override
# deploy/compose.ci.yml, and check both (deploy/container_checks.py says exactly what).
#
# The engine is Debian's podman + buildah (runc, cgroupfs, host networking) with podman-compose
# 1.6.0 from PyPI (Debian's 1.0.3 adds a default network next to `network_mode: host`, which podman
# refuses, and appends an override's `command` to the base one). Nothing is pulled from a registry
# of images:
# - the base image is `debootstrap --variant=minbase bookworm` (+ Debian's python3 3.11) from the
#   Debian mirror apt uses here, imported with `podman import`, then tagged with the exact name
#   the Dockerfile's FROM pins (docker.io/library/python:3.11.14-slim-bookworm) so the Dockerfile
#   builds unchanged; it is a stand-in, not the official image (its Python is Debian's 3.11.2);
# - Prometheus and Alertmanager images are built on that base from Debian's packages
#   (deploy/images/);
# - the project's dependencies are built into wheels on the host (`pip wheel`, PyPI), and the
#   Dockerfile takes them from the build context's wheelhouse/ (the build runs with --network none).
#
# Cached between runs (so a re-run costs well under a minute): images tagged with a hash of their
# inputs are not rebuilt (the base: BASE_RECIPE and the mirror; Prometheus/Alertmanager: their
# Containerfile and the base; the proxy: its build context, the Dockerfile and the base), and the
# wheelhouse is keyed by the dependencies and the Python. Cache: $TM_CI_CACHE
# (/var/cache/together-meter-ci) and podman's image store; `TM_CI_CACHE=... ` to move it.
# Containers and volumes are removed at the end, whatever the outcome; images are kept.
#
# Needs root (podman rootful, debootstrap) and the fixed host ports 8787, 9787, 9090, 9093 (the
# checks wait up to a minute for them); the simulator gets a free port.
# Usage: bash deploy/container-test.sh [--tier all|image|stack]   (exit 0 only if every check passed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${TM_CI_CACHE:-/var/cache/together-meter-ci}
PYTHON=${PYTHON:-python3}                 # builds the wheels: must be CPython 3.11 like the image
CHECK_PYTHON=${CHECK_PYTHON:-$ROOT/.venv/bin/python}   # runs container_checks.py (needs PyYAML)
PODMAN_COMPOSE_VERSION=1.6.0
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
# Bump when the recipe of the base (build_base below) changes: it is part of the base's hash.
BASE_RECIPE="v1 debootstrap --variant=minbase $SUITE +$BASE_PACKAGES; no apt lists; ENV PATH LANG; CMD python3"
PROXY_IMAGE=localhost/together-meter:0.1.0    # docker-compose.yml's `image: together-meter:0.1.0`
PROJECT=together-meter-ci

T0=$SECONDS
step() { echo "[container-test $(date +%T) +$((SECONDS - T0))s] $*"; }
die() { echo "container-test: $*" >&2; exit 1; }
short_hash() { sha256sum | cut -c1-12; }

[[ $(id -u) == 0 ]] || die "needs root (rootful podman, debootstrap)"
[[ -x $CHECK_PYTHON ]] || die "no $CHECK_PYTHON: run \`make install\` (or set CHECK_PYTHON)"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "$PYTHON is not Python 3.11: the wheels must match the image's Python 3.11"

RUN_DIR=$(mktemp -d /tmp/together-meter-ci.XXXXXX)
cleanup() {
  local rc=$?
  # the checks remove what they start; this catches an interrupted run (containers by name/label)
  podman rm --force --volumes --time 5 tm-ci-proxy tm-ci-simulator >/dev/null 2>&1 || true
  local ids
  ids=$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null || true)
  [[ -z $ids ]] || podman rm --force --volumes --time 5 $ids >/dev/null 2>&1 || true
  ids=$(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null || true)
  [[ -z $ids ]] || podman volume rm --force $ids >/dev/null 2>&1 || true
  podman volume rm --force tm-ci-ledger >/dev/null 2>&1 || true
  rm -rf "$RUN_DIR"
  step "done (exit $rc)"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# ---- the engine ---------------------------------------------------------------------------------
need=()
for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  step "installing ${need[*]} (Debian)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
mkdir -p "$CACHE"
# Loaded instead of /etc/containers/containers.conf (which is left alone). runc cannot raise
# rlimits here (no CAP_SYS_RESOURCE), and podman's defaults for root are above the hard limits
# ("error setting rlimit type 7/6: operation not permitted"): use the host's own hard nofile and
# a modest nproc. No systemd: cgroupfs, events and logs to files. Never pull an image.
cat >"$CACHE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
pull_policy = "never"
EOF
export CONTAINERS_CONF=$CACHE/containers.conf
PODMAN_COMPOSE=$CACHE/podman-compose-$PODMAN_COMPOSE_VERSION/bin/podman-compose
if [[ ! -x $PODMAN_COMPOSE ]]; then
  step "installing podman-compose $PODMAN_COMPOSE_VERSION (PyPI)"
  rm -rf "$CACHE/podman-compose-$PODMAN_COMPOSE_VERSION"
  "$PYTHON" -m venv "$CACHE/podman-compose-$PODMAN_COMPOSE_VERSION"
  "$CACHE/podman-compose-$PODMAN_COMPOSE_VERSION/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
fi
step "$(podman --version), $(buildah --version | cut -d' ' -f1-3), podman-compose $PODMAN_COMPOSE_VERSION"

# ---- the base image: debootstrap + Debian's python3, under the Dockerfile's pinned FROM name ----
debian_mirror() {
  # the first plain Debian archive URI apt uses here (deb822 .sources or one-line .list)
  local uri
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -nE 's/^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)([^[:space:]]+).*/\3/p' \
    | grep -E '^https?://[^ ]*/debian/?$' | head -1 || true)
  echo "${TM_CI_DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}
MIRROR=$(debian_mirror)
BASE=localhost/$PROJECT/debian-python:$SUITE-$(printf '%s\n' "$BASE_RECIPE" "$MIRROR" "$(uname -m)" | short_hash)

build_base() {
  local dir=$CACHE/rootfs
  unmount_under "$dir"
  rm -rf --one-file-system "$dir"
  step "debootstrap $SUITE from $MIRROR (+$BASE_PACKAGES)"
  if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$dir" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
    tail -40 "$CACHE/debootstrap.log" >&2
    unmount_under "$dir"
    die "debootstrap failed (log: $CACHE/debootstrap.log)"
  fi
  unmount_under "$dir"
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb
  tar --numeric-owner -C "$dir" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >/dev/null
  rm -rf --one-file-system "$dir"
}
unmount_under() {  # anything debootstrap left mounted inside the rootfs, deepest first
  local target
  for target in $(awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$target" || true
  done
}
if podman image exists "$BASE"; then
  step "base image $BASE (cached)"
else
  build_base
  step "base image $BASE built"
fi
from=$(awk 'toupper($1) == "FROM" {print $2}' Dockerfile | sort -u)
[[ $from == python:* && $(wc -l <<<"$from") == 1 ]] || die "expected one official python:* base in Dockerfile, got: $from"
podman tag "$BASE" "docker.io/library/$from"
step "tagged docker.io/library/$from -> $BASE ($(podman run --rm --network none "$BASE" python3 --version 2>/dev/null))"

# ---- Prometheus and Alertmanager from Debian's packages ----------------------------------------
for name in prometheus alertmanager; do
  image=localhost/$PROJECT/$name:$( (cat "deploy/images/$name/Containerfile"; echo "$BASE") | short_hash)
  if podman image exists "$image"; then
    step "$name image $image (cached)"
  else
    step "building $name image from Debian's package (apt over host networking)"
    podman build --quiet --format docker --pull=never --network host --build-arg "BASE=$BASE" \
      -t "$image" "deploy/images/$name" >/dev/null
  fi
  podman tag "$image" "localhost/$PROJECT/$name:debian12"   # the name deploy/compose.ci.yml uses
done

# ---- the proxy image from the real Dockerfile ------------------------------------------------
reqs=$RUN_DIR/requirements.txt
"$PYTHON" - >"$reqs" <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"] + ["wheel"]))
EOF
WHEELHOUSE=$CACHE/wheelhouse/$( (cat "$reqs"; "$PYTHON" -c 'import sys, platform; print(sys.version_info[:2], platform.machine())') | short_hash)
if [[ -f $WHEELHOUSE/.complete ]]; then
  step "wheelhouse $WHEELHOUSE (cached)"
else
  step "building the dependencies' wheels on the host (pip wheel, PyPI)"
  rm -rf "$WHEELHOUSE" "$WHEELHOUSE.tmp"
  "$PYTHON" -m pip wheel -q --wheel-dir "$WHEELHOUSE.tmp" -r "$reqs" 2> >(grep -v "^WARNING: Location" >&2)
  touch "$WHEELHOUSE.tmp/.complete"
  mv "$WHEELHOUSE.tmp" "$WHEELHOUSE"
fi
# The build context: what .dockerignore lets into `docker build .` (pyproject.toml, README.md,
# proxy/ without bytecode) plus the wheelhouse.
context=$RUN_DIR/context
mkdir -p "$context/wheelhouse"
cp pyproject.toml README.md "$context/"
tar -c --exclude=__pycache__ --exclude='*.pyc' proxy | tar -x -C "$context"
cp -l "$WHEELHOUSE"/*.whl "$context/wheelhouse/" 2>/dev/null || cp "$WHEELHOUSE"/*.whl "$context/wheelhouse/"
# Built without buildah's layer cache: buildah 1.28 keys the final stage's
# `RUN --mount=type=bind,from=build` on the instruction only, not on the build stage's wheels, so a
# cached build would keep an old venv after a source change. Instead, the image is tagged with a
# hash of its inputs (the context, the Dockerfile, the base) and not rebuilt while they are equal.
inputs=$( (cd "$context" && find . -type f -print0 | sort -z | xargs -0 sha256sum
  cat "$ROOT/Dockerfile"; podman image inspect --format '{{.Id}}' "$BASE") | short_hash)
PROXY_BUILT=localhost/$PROJECT/proxy:$inputs
if podman image exists "$PROXY_BUILT"; then
  step "$PROXY_IMAGE = $PROXY_BUILT (cached: same context, Dockerfile and base)"
else
  step "building $PROXY_IMAGE from Dockerfile (--network none; --format docker keeps HEALTHCHECK)"
  if ! podman build --no-cache --format docker --pull=never --network none -f Dockerfile \
    -t "$PROXY_BUILT" "$context" >"$RUN_DIR/build.log" 2>&1; then
    tail -60 "$RUN_DIR/build.log" >&2
    die "podman build of Dockerfile failed"
  fi
fi
podman tag "$PROXY_BUILT" "$PROXY_IMAGE"
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=localhost/$PROJECT/proxy"); do
  # earlier sources' images (the listing also names their other tags: keep to ours)
  [[ $old == "localhost/$PROJECT/proxy:"* && $old != "$PROXY_BUILT" ]] && podman rmi "$old" >/dev/null 2>&1 || true
done
podman image prune --force >/dev/null 2>&1 || true   # their untagged layers

# ---- run and check ------------------------------------------------------------------------------
config_dir=$RUN_DIR/config
mkdir -p "$config_dir"
cp config/docker.yaml config/prices.yaml "$config_dir/"
# both listeners on loopback: under host networking the container's 0.0.0.0 is the host's
sed -i -E 's/^(listen|admin): \{host: 0\.0\.0\.0,/\1: {host: 127.0.0.1,/' "$config_dir/docker.yaml"
[[ $(grep -cE '^(listen|admin): \{host: 127\.0\.0\.1,' "$config_dir/docker.yaml") == 2 ]] \
  || die "config/docker.yaml no longer has 'listen: {host: 0.0.0.0, ...' and 'admin: {host: 0.0.0.0, ...'"
chown -R 10001:10001 "$config_dir"   # `keys create` in the image (uid 10001) writes keys.yaml here
step "running the checks"
"$CHECK_PYTHON" deploy/container_checks.py --image "$PROXY_IMAGE" --config-dir "$config_dir" \
  --podman-compose "$PODMAN_COMPOSE" "$@"
step "container tier passed"
