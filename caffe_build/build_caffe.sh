#!/usr/bin/env bash
# Build BVLC Caffe (CPU, pycaffe, Python layers, the `caffe` binary) from Debian's
# bullseye source package, once, and cache the installed tree outside the work tree.
#
#   caffe_build/build_caffe.sh PYTHON
#   CUDA=1 caffe_build/build_caffe.sh PYTHON     (opt-in GPU build, ~15 min on 2 cores)
#
# PYTHON is the interpreter that will import caffe (it must have numpy). On success
# the last line on stdout is the install prefix:
#   PREFIX/bin/caffe, PREFIX/lib/libcaffe.so, PREFIX/lib/python3/dist-packages/caffe
# The prefix is keyed by source version, build flags, our patches and the Python it
# links against, so a second run with the same inputs returns at once.
#
# Environment: SAFE_LAYERS_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/safe_layers),
# SAFE_LAYERS_DEBIAN_MIRROR (default http://deb.debian.org/debian), JOBS (default nproc).
#
# CUDA=1 builds with CUDA instead (no cuDNN, no NCCL): the toolkit is the one nvcc
# belongs to (CUDA_HOME to pick another), cuBLAS and cuRAND come from their PyPI wheels
# (pinned below), CUDA_ARCHS (default "80 90": A100, H100/H200) picks the SASS built, no
# PTX. The key adds the nvcc version, the archs, the wheels and patches/cuda/*.patch.
# Its objects go through ccache (SAFE_LAYERS_CACHE/ccache, one fixed build path), so a
# build for a second Python recompiles only what includes Python. A Python whose
# Boost.Python Debian does not ship gets one from build_boost_python.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${1:?usage: build_caffe.sh PYTHON}

caffe_version=1.0.0+git20180821.99bd997-8
mirror=${SAFE_LAYERS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache_root=${SAFE_LAYERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/safe_layers}
jobs=${JOBS:-$(nproc)}

die() { printf 'build_caffe: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=caffe_build/private_apt.sh
source "$here/private_apt.sh"
log() { printf 'build_caffe: %s\n' "$*" >&2; }

# ---- build dependencies (apt) ------------------------------------------------
apt_packages=(
  build-essential cmake patch dpkg-dev
  libboost-system-dev libboost-thread-dev libboost-filesystem-dev libboost-python-dev
  libprotobuf-dev protobuf-compiler libgoogle-glog-dev libgflags-dev libhdf5-dev
  libopenblas-dev liblmdb-dev libleveldb-dev libsnappy-dev
)
cuda=${CUDA:-0}
case $cuda in 0|"") cuda=0 ;; 1) ;; *) die "CUDA=$cuda; allowed: 0 (CPU build) or 1 (CUDA build)" ;; esac
((cuda)) && apt_packages+=(ccache)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$pkg")
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
print("%d%d" % sys.version_info[:2])
EOF
) || die "cannot use $python to build pycaffe (it needs numpy and a shared libpython; see above)"
{ read -r py_exe; read -r py_lib; read -r py_include; read -r np_include; read -r py_ident; read -r py_nodot; } <<<"$py_info"

# Debian's Boost.Python serves one Python (3.11 in bookworm); another gets its own.
boost_flags=()
if [[ ! -e /usr/lib/x86_64-linux-gnu/libboost_python$py_nodot.so ]]; then
  boost_prefix=$("$here/build_boost_python.sh" "$python" | tail -n 1) \
    || die "no Boost.Python for Python ${py_ident% *} (build_boost_python.sh failed, see above)"
  # Caffe asks FindBoost for the component "python3" (from -Dpython_version=3).
  boost_flags=(-DBoost_NO_BOOST_CMAKE=ON "-DBOOST_LIBRARYDIR=$boost_prefix/lib"
               "-DBoost_PYTHON3_LIBRARY_RELEASE=$boost_prefix/lib/libboost_python$py_nodot.so")
  # Its own Boost.Python headers (Python 3.13 and later) before the system's.
  if [[ -f $boost_prefix/include/boost/python.hpp ]]; then
    boost_flags+=("-DCMAKE_CXX_FLAGS=-I$boost_prefix/include")
  fi
fi

cmake_flags=(
  -DCPU_ONLY=ON -DBUILD_python=ON -DBUILD_python_layer=ON -Dpython_version=3
  -DUSE_OPENCV=OFF -DUSE_LMDB=ON -DUSE_LEVELDB=ON -DBLAS=Open -DBUILD_docs=OFF
  -DCMAKE_BUILD_TYPE=Release
)
patches=("$here"/patches/*.patch)
if ((cuda)); then
  # ---- CUDA: the toolkit, and cuBLAS/cuRAND from their wheels -------------------
  # Pinned to the CUDA 13.0 release, like the toolkit here; a machine's own newer 13.x
  # libraries serve the same sonames at run time.
  cuda_wheels=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
  cuda_archs=${CUDA_ARCHS:-80 90}
  [[ $cuda_archs =~ ^[0-9]+( [0-9]+)*$ ]] || die "CUDA_ARCHS='$cuda_archs'; allowed: compute capabilities without dots, e.g. \"80 90\""
  toolkit=
  nvcc_path=$(command -v nvcc || true)
  for candidate in "${CUDA_HOME:-}" /usr/local/cuda ${nvcc_path:+"$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")"}; do
    if [[ -n $candidate && -x $candidate/bin/nvcc && -f $candidate/include/cuda_runtime.h ]]; then
      toolkit=$(readlink -f "$candidate"); break
    fi
  done
  [[ -n $toolkit ]] || die "CUDA=1 needs a CUDA toolkit (bin/nvcc and include/cuda_runtime.h); set CUDA_HOME to its root"
  nvcc_version=$("$toolkit/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
  [[ -n $nvcc_version ]] || die "cannot read the CUDA version from $toolkit/bin/nvcc --version"
  cmake_flags=(
    -DCPU_ONLY=OFF -DUSE_CUDNN=OFF -DUSE_NCCL=OFF -DCUDA_ARCH_NAME=Manual
    "-DCUDA_ARCH_BIN=$cuda_archs" -DCUDA_ARCH_PTX=
    -DBUILD_python=ON -DBUILD_python_layer=ON -Dpython_version=3
    -DUSE_OPENCV=OFF -DUSE_LMDB=ON -DUSE_LEVELDB=ON -DBLAS=Open -DBUILD_docs=OFF
    -DCMAKE_BUILD_TYPE=Release
  )
  patches+=("$here"/patches/cuda/*.patch)
  libs_key=$( { echo "$toolkit $nvcc_version"; echo "${cuda_wheels[*]}"; } | sha256sum | cut -c1-12)
  # A toolkit-shaped tree for CMake's FindCUDA: the toolkit plus the wheels' headers and
  # libraries, and an nvcc that compiles through ccache.
  cuda_root=$cache_root/cuda-$nvcc_version-$libs_key
  if [[ ! -f $cuda_root/.complete ]]; then
    log "assembling $cuda_root (toolkit $toolkit + ${cuda_wheels[*]})"
    rm -rf "$cuda_root"
    mkdir -p "$cuda_root"/{bin,include,lib64}
    "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$cuda_root/wheels" \
      "${cuda_wheels[@]}" >&2 || die "pip could not install ${cuda_wheels[*]}"
    wheel_dir=$(ls -d "$cuda_root"/wheels/nvidia/cu*/ | head -n 1)
    [[ -f $wheel_dir/include/cublas_v2.h && -f $wheel_dir/include/curand.h ]] \
      || die "the cuBLAS/cuRAND wheels have no headers under $wheel_dir"
    for entry in "$toolkit"/*; do
      case $(basename "$entry") in bin|include|lib|lib64) ;; *) ln -s "$entry" "$cuda_root/" ;; esac
    done
    for entry in "$toolkit"/bin/*; do
      [[ $(basename "$entry") == nvcc ]] || ln -s "$entry" "$cuda_root/bin/"
    done
    printf '#!/bin/sh\n# nvcc through ccache (made by build_caffe.sh)\nexec ccache %q "$@"\n' \
      "$toolkit/bin/nvcc" >"$cuda_root/bin/nvcc"
    chmod +x "$cuda_root/bin/nvcc"
    for entry in "$toolkit"/include/* "$wheel_dir"/include/*; do ln -sf "$entry" "$cuda_root/include/"; done
    for entry in "$(readlink -f "$toolkit/lib64")"/* "$wheel_dir"/lib/*; do ln -sf "$entry" "$cuda_root/lib64/"; done
    # The wheels ship only versioned sonames; the linker looks for the plain name.
    for lib in "$cuda_root"/lib64/lib*.so.[0-9]*; do
      plain=${lib%%.so.*}.so
      [[ -e $plain ]] || ln -s "$(basename "$lib")" "$plain"
    done
    touch "$cuda_root/.complete"
  fi
  cmake_flags+=("-DCUDA_TOOLKIT_ROOT_DIR=$cuda_root")
  export CCACHE_DIR=${CCACHE_DIR:-$cache_root/ccache} CCACHE_BASEDIR=$cache_root/cuda-work
  export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-4G} CCACHE_COMPILERCHECK=content
  key=$( { echo "$caffe_version"; echo "${cmake_flags[*]}"; echo "$py_lib $py_ident"; echo "${boost_flags[*]}"
           cat "${patches[@]}"; } | sha256sum | cut -c1-12)
  prefix=$cache_root/caffe-$caffe_version-cuda$nvcc_version-sm${cuda_archs// /_}-$key
else
  key=$( { echo "$caffe_version"; echo "${cmake_flags[*]}"; echo "$py_lib $py_ident"; cat "${patches[@]}"; } \
         | sha256sum | cut -c1-12)
  prefix=$cache_root/caffe-$caffe_version-cpu-$key
fi

if [[ -f $prefix/.complete ]]; then
  log "reusing cached Caffe at $prefix"
  echo "$prefix"
  exit 0
fi

# ---- fetch the source without touching the system's apt configuration ----------
mkdir -p "$cache_root"
if ((cuda)); then
  # One fixed place, so ccache sees the same paths from one build to the next; builds
  # take turns there.
  work=$cache_root/cuda-work
  exec 9>"$cache_root/cuda-work.lock"
  flock 9
  rm -rf "$work"
  mkdir -p "$work"
  trap 'rm -rf "$work/src" "$work/build" "$work/apt"' EXIT
  log "building CUDA Caffe $caffe_version (sm $cuda_archs) into $prefix (about 15 minutes on 2 cores, less from ccache; log: $work/build.log)"
else
  work=$(mktemp -d "$cache_root/build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  log "building Caffe $caffe_version into $prefix (about 3-5 minutes; log: $work/build.log)"
fi
private_apt_sources "$work" bullseye "$mirror" \
  || die "cannot read the bullseye source index from $mirror (set SAFE_LAYERS_DEBIAN_MIRROR to a reachable Debian mirror)"
(cd "$work" && apt-get "${apt_private[@]}" -qq source --download-only "caffe=$caffe_version" >&2) \
  || die "cannot download source package caffe=$caffe_version from $mirror"
(cd "$work" && dpkg-source -x "caffe_$caffe_version.dsc" src >&2) || die "dpkg-source could not unpack caffe_$caffe_version.dsc"

for p in "${patches[@]}"; do
  patch -d "$work/src" -p1 --forward --quiet <"$p" >&2 || die "patch $(basename "$p") does not apply"
done

# ---- configure, build, install ------------------------------------------------
mkdir -p "$work/build"
(
  cd "$work/build"
  launcher=()
  ((cuda)) && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
  cmake ../src "${cmake_flags[@]}" "${boost_flags[@]}" "${launcher[@]}" -DCMAKE_INSTALL_PREFIX="$prefix" \
    -DPYTHON_EXECUTABLE="$py_exe" -DPYTHON_LIBRARY="$py_lib" -DPYTHON_INCLUDE_DIR="$py_include" \
    -DNUMPY_INCLUDE_DIR="$np_include"
  if ((cuda)); then ccache -z; fi
  make -j"$jobs" all
  if ((cuda)); then ccache -s; fi
  rm -rf "$prefix"   # a half-installed prefix from an interrupted run
  make install
) >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "the Caffe build failed (last lines above)"; }

pycaffe_so=$prefix/lib/python3/dist-packages/caffe/_caffe.so
# grep reads all of ldd's output: with pipefail, `grep -q` quitting at the first match
# would fail the pipeline through ldd's SIGPIPE.
if [[ -n ${boost_prefix:-} ]] && ! ldd "$pycaffe_so" | grep "libboost_python$py_nodot" >/dev/null; then
  # CMake's Boost search falls back to any python3 flavour; that would be two Pythons.
  die "pycaffe links another Python's Boost.Python: $(ldd "$pycaffe_so" | grep boost_python)"
fi
cp "$work/build.log" "$prefix/build.log"
# Only a finished install is marked; anything else is rebuilt next time.
touch "$prefix/.complete"
log "Caffe installed at $prefix"
echo "$prefix"
