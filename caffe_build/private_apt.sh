# Sourced by build_caffe.sh and build_boost_python.sh: one Debian suite's source index in
# a private apt state under WORK (the system's apt sources and lists are never touched).
#
#   private_apt_sources WORK SUITE MIRROR || die "..."
#
# Sets the array apt_private, the options every later apt-get call of the caller passes,
# and runs `apt-get update` with them; its status is update's.
private_apt_sources() {
  local work=$1 suite=$2 mirror=$3
  mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial" || return
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
    >"$work/apt/sources.list" || return
  apt_private=(-o "Dir::Etc::sourcelist=$work/apt/sources.list" -o Dir::Etc::sourceparts=/nonexistent
               -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache::archives=$work/apt/archives"
               -o APT::Sandbox::User=root)
  apt-get "${apt_private[@]}" -qq update >&2
}
