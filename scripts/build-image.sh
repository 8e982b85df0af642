#!/usr/bin/env bash
# `make image`: builds the Wharf container image here, from what is on this machine (no base image
# is pulled): the `--profile dist` binaries, the shared libraries they link, the system's CA bundle
# and a passwd file, in an image `FROM scratch` (deploy/image/Dockerfile).
#
# Uses the docker daemon that answers (DOCKER_HOST or the default socket); when none does, starts a
# private dockerd under target/image-dockerd for the build and stops it afterwards. Either way the
# image is also saved as target/image/wharf-<version>.tar (`docker load -i`, or `skopeo copy
# docker-archive:...` to push it).
#
# Environment: IMAGE (default wharf:<version>).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/ensure-deps.sh image
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
source_url=$(git config --get remote.origin.url 2>/dev/null || echo unknown)
image=${IMAGE:-wharf:$version}

echo "build-image: building the binaries (cargo build --profile dist, commit $commit)"
WHARF_GIT_COMMIT=$commit cargo build --profile dist -p wharf-proxy -p wharf-control -p wharf-cli --bins

ctx=target/image/context
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/ssl/certs" "$ctx/empty"
bins=(wharf-proxy wharf-control regctl)
for b in "${bins[@]}"; do
  cp "target/dist/$b" "$ctx/rootfs/usr/local/bin/"
done
# The shared libraries the binaries link (glibc, libm, libgcc_s, the loader), at their own paths.
libs=$(for b in "${bins[@]}"; do ldd "target/dist/$b"; done | grep -o '/[^ ]*' | sort -u)
for lib in $libs; do
  cp -L --parents "$lib" "$ctx/rootfs/"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/"
printf 'root:x:0:0:root:/nonexistent:/sbin/nologin\nwharf:x:65532:65532:Wharf:/nonexistent:/sbin/nologin\n' > "$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nwharf:x:65532:\n' > "$ctx/rootfs/etc/group"
cp deploy/image/Dockerfile "$ctx/"

started=""
if ! docker info >/dev/null 2>&1; then
  d="$root/target/image-dockerd"
  mkdir -p "$d"
  echo "build-image: no docker daemon answers; starting one under $d (stopped after the build)"
  dockerd --data-root "$d/root" --exec-root "$d/exec" --pidfile "$d/docker.pid" -H "unix://$d/docker.sock" \
    --iptables=false --ip6tables=false --bridge=none >"$d/dockerd.log" 2>&1 &
  started=$!
  export DOCKER_HOST="unix://$d/docker.sock"
  trap 'kill "$started" 2>/dev/null; wait "$started" 2>/dev/null || true' EXIT
  for _ in $(seq 1 150); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$started" 2>/dev/null || { echo "build-image: dockerd exited:"; tail -20 "$d/dockerd.log"; exit 1; }
    sleep 0.2
  done
  docker info >/dev/null 2>&1 || { echo "build-image: dockerd did not answer within 30 s:"; tail -20 "$d/dockerd.log"; exit 1; }
fi

docker build -q --build-arg "VERSION=$version" --build-arg "REVISION=$commit" --build-arg "SOURCE=$source_url" \
  -t "$image" "$ctx" >/dev/null
mkdir -p target/image
docker save -o "target/image/wharf-$version.tar" "$image"
size=$(docker image inspect --format '{{.Size}}' "$image")
echo "build-image: $image built: $((size / 1000000)) MB ($size bytes); saved as target/image/wharf-$version.tar"
for b in "${bins[@]}"; do
  printf 'build-image:   %-14s %s bytes\n' "$b" "$(stat -c %s "target/dist/$b")"
done
