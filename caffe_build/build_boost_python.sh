#!/usr/bin/env bash
# Build Boost.Python for a Python that Debian's libboost-python does not serve (bookworm
# builds it for 3.11 only), from the same Boost as the system's headers: Debian's
# boost1.74 source package with Debian's own Boost.Python patches. Cached.
#
#   caffe_build/build_boost_python.sh PYTHON
#
# The last line on stdout is the prefix: PREFIX/lib/libboost_pythonXY.so (XY: PYTHON's
# version), and for Python 3.13 and later PREFIX/include/boost/python (see below). About 30 s on 2 cores; the source download is 60 MB, once.
#
# Environment: SAFE_LAYERS_CACHE, SAFE_LAYERS_DEBIAN_MIRROR, JOBS (as build_caffe.sh).
set -euo pipefail

python=${1:?usage: build_boost_python.sh PYTHON}
boost_version=1.74.0+ds1-21
mirror=${SAFE_LAYERS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache_root=${SAFE_LAYERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/safe_layers}
jobs=${JOBS:-$(nproc)}
# Debian's patches that touch Boost.Python, in the order of debian/patches/series.
python_patches=(python3.10-file.patch python3.10-pep-620.patch fix-enum.patch python-enum.patch)

die() { printf 'build_boost_python: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'build_boost_python: %s\n' "$*" >&2; }
# shellcheck source=caffe_build/private_apt.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/private_apt.sh"

installed=$(dpkg-query -W -f='${Version}' libboost-python1.74-dev 2>/dev/null || true)
[[ $installed == "$boost_version" ]] \
  || die "the system's Boost headers are libboost-python1.74-dev '${installed:-not installed}', this builds $boost_version"

py_info=$("$python" -c 'import sys, sysconfig; print("%d%d" % sys.version_info[:2]); print(sysconfig.get_paths()["include"])') \
  || die "cannot run $python"
{ read -r py_nodot; read -r py_include; } <<<"$py_info"
# Python 3.13 removed PyEval_CallFunction and PyEval_CallMethod, which Boost.Python 1.74's
# headers call (always with a parenthesised format, which makes PyObject_CallFunction and
# PyObject_CallMethod the same calls): for 3.13 and later the headers are changed to call
# those, and installed with the library for Caffe to compile against instead of the system's.
header_fixes=
if ((py_nodot >= 313)); then
  header_fixes='s/PyEval_CallFunction(/PyObject_CallFunction(/g; s/PyEval_CallMethod(/PyObject_CallMethod(/g'
fi
key=$( { echo "$boost_version ${python_patches[*]}"; echo "$py_nodot $py_include $header_fixes"; } \
       | sha256sum | cut -c1-12)
prefix=$cache_root/boost-python$py_nodot-$boost_version-$key
if [[ -f $prefix/.complete ]]; then
  log "reusing $prefix"
  echo "$prefix"
  exit 0
fi

mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/boost-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building Boost.Python for Python ${py_nodot:0:1}.${py_nodot:1} into $prefix"
private_apt_sources "$work" bookworm "$mirror" || die "cannot read the bookworm source index from $mirror"
(cd "$work" && apt-get "${apt_private[@]}" -qq source --download-only "boost1.74=$boost_version" >&2) \
  || die "cannot download source package boost1.74=$boost_version from $mirror"
# Only Boost.Python's own tree: the rest of Boost is the system's (same version).
tar -xJf "$work"/boost1.74_*.orig.tar.xz -C "$work" boost/libs/python/src boost/libs/python/include \
  || die "the boost1.74 source has no libs/python"
tar -xJf "$work"/boost1.74_*.debian.tar.xz -C "$work" debian/patches
for p in "${python_patches[@]}"; do
  patch -d "$work/boost" -p1 --forward --quiet <"$work/debian/patches/$p" >&2 || die "Debian patch $p does not apply"
done

if [[ -n $header_fixes ]]; then
  grep -rlE 'PyEval_Call(Function|Method)\(' "$work/boost/libs/python/include" | xargs sed -i "$header_fixes"
fi

src=$work/boost/libs/python/src
mkdir -p "$work/obj" "$prefix/lib"
# The numpy extension of Boost.Python is not used by Caffe.
mapfile -t sources < <(cd "$src" && find . -name '*.cpp' -not -path './numpy/*' | sort)
compile_one() {  # SOURCE (relative to src) -> obj/SOURCE_WITH_UNDERSCORES.o
  g++ -O2 -fPIC -std=c++14 -DBOOST_PYTHON_SOURCE -DBOOST_PYTHON_DYN_LINK -DNDEBUG \
    -I"$work/boost/libs/python/include" -I"$py_include" -c "$src/$1" -o "$work/obj/$(echo "${1#./}" | tr / _).o"
}
export -f compile_one
export work py_include src
printf '%s\n' "${sources[@]}" | xargs -P "$jobs" -I{} bash -c 'compile_one "$1"' _ {} >"$work/build.log" 2>&1 \
  || { tail -n 30 "$work/build.log" >&2; die "compiling Boost.Python failed"; }
so=libboost_python$py_nodot.so.1.74.0
g++ -shared -Wl,-soname,"$so" -o "$prefix/lib/$so" "$work"/obj/*.o >>"$work/build.log" 2>&1 \
  || { tail -n 30 "$work/build.log" >&2; die "linking Boost.Python failed"; }
ln -sf "$so" "$prefix/lib/libboost_python$py_nodot.so"
if [[ -n $header_fixes ]]; then
  mkdir -p "$prefix/include/boost"
  cp -r "$work/boost/libs/python/include/boost/python" "$work/boost/libs/python/include/boost/python.hpp" \
    "$prefix/include/boost/"
fi
touch "$prefix/.complete"
log "Boost.Python installed at $prefix"
echo "$prefix"
