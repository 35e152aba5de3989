#!/usr/bin/env bash
# Install a real Consul 1.8.7 binary into .tools/consul/usr/bin/consul (idempotent).
#
# Debian 12 has no consul package; Debian 11 (bullseye) does (1.8.7). This script fetches that .deb with apt
# using a private sources list, private lists and a private cache under .tools/apt-bullseye/, then unpacks it
# with `dpkg -x`. The system's apt sources, lists and caches are never modified.
set -euo pipefail

readonly WANTED_VERSION="1.8.7"
readonly KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly TOOLS_DIR="${repo_root}/.tools"
readonly CONSUL_DIR="${TOOLS_DIR}/consul"
readonly CONSUL_BIN="${CONSUL_DIR}/usr/bin/consul"
readonly APT_DIR="${TOOLS_DIR}/apt-bullseye"

log() { printf 'install-consul: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

has_wanted_version() {
  # grep reads all the output (not -q): under pipefail, consul writing its second line after grep -q exited would
  # die of SIGPIPE and fail the check now and then.
  [[ -x "${CONSUL_BIN}" ]] && "${CONSUL_BIN}" version 2>/dev/null | grep "^Consul v${WANTED_VERSION}\$" >/dev/null
}

# Print the first URI of the deb822 stanza whose Suites list contains exactly "bookworm".
uri_from_deb822() {
  local file
  for file in /etc/apt/sources.list.d/*.sources; do
    [[ -r "${file}" ]] || continue
    awk '
      BEGIN { RS = ""; FS = "\n" }
      {
        uri = ""; bookworm = 0
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^[ \t]*#/) continue
          if (tolower(line) ~ /^uris:/) { sub(/^[^:]*:[ \t]*/, "", line); split(line, u, /[ \t]+/); uri = u[1] }
          if (tolower(line) ~ /^suites:/) {
            sub(/^[^:]*:[ \t]*/, "", line); n = split(line, s, /[ \t]+/)
            for (j = 1; j <= n; j++) if (s[j] == "bookworm") bookworm = 1
          }
        }
        if (bookworm && uri != "") { print uri; exit }
      }' "${file}"
  done | head -n 1
}

# Print the URI of the first one-line "deb ... bookworm ..." entry in /etc/apt/sources.list.
uri_from_sources_list() {
  [[ -r /etc/apt/sources.list ]] || return 0
  awk '
    $1 == "deb" {
      i = 2
      if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
      if ($(i + 1) == "bookworm") { print $i; exit }
    }' /etc/apt/sources.list
}

debian_mirror_uri() {
  local uri
  uri="$(uri_from_deb822)"
  [[ -n "${uri}" ]] || uri="$(uri_from_sources_list)"
  [[ -n "${uri}" ]] || die "no Debian bookworm mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
  printf '%s\n' "${uri}"
}

download_consul_deb() {
  local uri="$1"
  local sources="${APT_DIR}/sources.list"
  mkdir -p "${APT_DIR}/lists/partial" "${APT_DIR}/cache/archives/partial" "${APT_DIR}/download"
  printf 'deb [signed-by=%s] %s bullseye main\n' "${KEYRING}" "${uri}" >"${sources}"

  local apt_opts=(
    -o "Dir::Etc::SourceList=${sources}"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=${APT_DIR}/lists"
    -o "Dir::Cache=${APT_DIR}/cache"
    -o "Dir::Cache::Archives=${APT_DIR}/cache/archives"
  )
  log "fetching the bullseye package index from ${uri}"
  apt-get -q "${apt_opts[@]}" update >&2
  rm -f "${APT_DIR}/download"/consul_*.deb
  log "downloading the consul package"
  # apt-get download writes into the cwd, which the unprivileged _apt sandbox user cannot write to; run the
  # fetch as root explicitly instead of letting apt fall back to it with a warning.
  (cd "${APT_DIR}/download" && apt-get -q "${apt_opts[@]}" -o APT::Sandbox::User=root download consul >&2)
}

unpack_consul_deb() {
  local debs=("${APT_DIR}/download"/consul_*.deb)
  [[ -f "${debs[0]}" ]] || die "apt-get download produced no consul_*.deb in ${APT_DIR}/download"
  rm -rf "${CONSUL_DIR}"
  mkdir -p "${CONSUL_DIR}"
  dpkg -x "${debs[0]}" "${CONSUL_DIR}"
}

main() {
  if has_wanted_version; then
    log "consul ${WANTED_VERSION} already installed at ${CONSUL_BIN}"
    exit 0
  fi
  command -v apt-get >/dev/null || die "apt-get not found (this recipe needs a Debian system)"
  [[ -r "${KEYRING}" ]] || die "${KEYRING} missing (install debian-archive-keyring)"

  download_consul_deb "$(debian_mirror_uri)"
  unpack_consul_deb
  has_wanted_version || die "${CONSUL_BIN} does not report version ${WANTED_VERSION}"
  log "installed $("${CONSUL_BIN}" version | head -n 1) at ${CONSUL_BIN}"
}

main "$@"
