#!/usr/bin/env bash
# Build BVLC Caffe (CPU, pycaffe, Python layers, the `caffe` binary) from Debian's
# bullseye source package, once, and cache the installed tree outside the work tree.
#
#   caffe_build/build_caffe.sh PYTHON
#
# PYTHON is the interpreter that will import caffe (it must have numpy). On success
# the last line on stdout is the install prefix:
#   PREFIX/bin/caffe, PREFIX/lib/libcaffe.so, PREFIX/lib/python3/dist-packages/caffe
# The prefix is keyed by source version, build flags, our patches and the Python it
# links against, so a second run with the same inputs returns at once.
#
# Environment: SAFE_LAYERS_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/safe_layers),
# SAFE_LAYERS_DEBIAN_MIRROR (default http://deb.debian.org/debian), JOBS (default nproc).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${1:?usage: build_caffe.sh PYTHON}

caffe_version=1.0.0+git20180821.99bd997-8
mirror=${SAFE_LAYERS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache_root=${SAFE_LAYERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/safe_layers}
jobs=${JOBS:-$(nproc)}

die() { printf 'build_caffe: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'build_caffe: %s\n' "$*" >&2; }

# ---- build dependencies (apt) ------------------------------------------------
apt_packages=(
  build-essential cmake patch dpkg-dev
  libboost-system-dev libboost-thread-dev libboost-filesystem-dev libboost-python-dev
  libprotobuf-dev protobuf-compiler libgoogle-glog-dev libgflags-dev libhdf5-dev
  libopenblas-dev liblmdb-dev libleveldb-dev libsnappy-dev
)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then sudo=(); elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n); else
    die "missing Debian packages: ${missing[*]}
  install them with:  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}
  then run this again."
  fi
  log "installing Debian packages: ${missing[*]}"
  mkdir -p "$cache_root"
  apt_log=$cache_root/apt-install.log
  { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1 \
    || { tail -n 20 "$apt_log" >&2; die "apt-get could not install: ${missing[*]} (log: $apt_log)"; }
fi

# ---- the Python that will import caffe ----------------------------------------
py_info=$("$python" - <<'EOF'
import os, sys, sysconfig
import numpy
libdir = sysconfig.get_config_var("LIBDIR")
ldlib = sysconfig.get_config_var("LDLIBRARY")
lib = os.path.realpath(os.path.join(libdir, ldlib))
if not lib.endswith(".so") and ".so." not in lib:
    sys.exit("caffe needs a shared libpython; %s is %s (build Python with --enable-shared)" % (sys.executable, lib))
print(sys.executable)
print(lib)
print(sysconfig.get_paths()["include"])
print(numpy.get_include())
print("%d.%d.%d" % sys.version_info[:3], numpy.__version__.split(".")[0])
EOF
) || die "cannot use $python to build pycaffe (it needs numpy and a shared libpython; see above)"
{ read -r py_exe; read -r py_lib; read -r py_include; read -r np_include; read -r py_ident; } <<<"$py_info"

cmake_flags=(
  -DCPU_ONLY=ON -DBUILD_python=ON -DBUILD_python_layer=ON -Dpython_version=3
  -DUSE_OPENCV=OFF -DUSE_LMDB=ON -DUSE_LEVELDB=ON -DBLAS=Open -DBUILD_docs=OFF
  -DCMAKE_BUILD_TYPE=Release
)
key=$( { echo "$caffe_version"; echo "${cmake_flags[*]}"; echo "$py_lib $py_ident"; cat "$here"/patches/*.patch; } \
       | sha256sum | cut -c1-12)
prefix=$cache_root/caffe-$caffe_version-cpu-$key

if [[ -f $prefix/.complete ]]; then
  log "reusing cached Caffe at $prefix"
  echo "$prefix"
  exit 0
fi

# ---- fetch the source without touching the system's apt configuration ----------
mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building Caffe $caffe_version into $prefix (about 3-5 minutes; log: $work/build.log)"
mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main" >"$work/apt/sources.list"
apt_private=(-o "Dir::Etc::sourcelist=$work/apt/sources.list" -o Dir::Etc::sourceparts=/nonexistent
             -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache::archives=$work/apt/archives"
             -o APT::Sandbox::User=root)
apt-get "${apt_private[@]}" -qq update >&2 \
  || die "cannot read the bullseye source index from $mirror (set SAFE_LAYERS_DEBIAN_MIRROR to a reachable Debian mirror)"
(cd "$work" && apt-get "${apt_private[@]}" -qq source --download-only "caffe=$caffe_version" >&2) \
  || die "cannot download source package caffe=$caffe_version from $mirror"
(cd "$work" && dpkg-source -x "caffe_$caffe_version.dsc" src >&2) || die "dpkg-source could not unpack caffe_$caffe_version.dsc"

for p in "$here"/patches/*.patch; do
  patch -d "$work/src" -p1 --forward --quiet <"$p" >&2 || die "patch $(basename "$p") does not apply"
done

# ---- configure, build, install ------------------------------------------------
mkdir -p "$work/build"
(
  cd "$work/build"
  cmake ../src "${cmake_flags[@]}" -DCMAKE_INSTALL_PREFIX="$prefix" \
    -DPYTHON_EXECUTABLE="$py_exe" -DPYTHON_LIBRARY="$py_lib" -DPYTHON_INCLUDE_DIR="$py_include" \
    -DNUMPY_INCLUDE_DIR="$np_include"
  make -j"$jobs" all
  rm -rf "$prefix"   # a half-installed prefix from an interrupted run
  make install
) >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "the Caffe build failed (last lines above)"; }

# Only a finished install is marked; anything else is rebuilt next time.
touch "$prefix/.complete"
log "Caffe installed at $prefix"
echo "$prefix"
