# shellcheck shell=bash
# Helpers common to the benchmark scripts (sourced, not run): a private OpenSSH
# server's files, waiting for a port, medians. Everything binds 127.0.0.1 or an
# address the caller gives; nothing here starts a process by itself.

# peer_ssh_files DIR PORT ADDR ALIAS
# Writes, once, a host key, a client key (DIR/clientkey) and authorized_keys,
# and, every time, DIR/sshd_config (listening on ADDR:PORT, root by key only,
# internal sftp) and DIR/ssh_config, where Host ALIAS reaches that server as root
# with the client key and no host-key prompt. Start the server with
#   /usr/sbin/sshd -D -f DIR/sshd_config -E DIR/sshd.log &
peer_ssh_files() {
  local dir=$1 port=$2 addr=$3 alias=$4
  mkdir -p "$dir" /run/sshd
  [[ -f $dir/hostkey ]] || ssh-keygen -q -t ed25519 -N '' -C peer-host -f "$dir/hostkey"
  [[ -f $dir/clientkey ]] || ssh-keygen -q -t ed25519 -N '' -C peer-client -f "$dir/clientkey"
  install -m 600 "$dir/clientkey.pub" "$dir/authorized_keys"
  cat >"$dir/sshd_config" <<EOF
Port $port
ListenAddress $addr
HostKey $dir/hostkey
AuthorizedKeysFile $dir/authorized_keys
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
Subsystem sftp internal-sftp
LogLevel ERROR
EOF
  cat >"$dir/ssh_config" <<EOF
Host $alias
  HostName $addr
  Port $port
  User root
  IdentityFile $dir/clientkey
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF
}

# peer_port_busy PORT: whether something listens on TCP 127.0.0.1:PORT.
peer_port_busy() {
  if command -v ss >/dev/null; then
    [[ -n $(ss -ltnH "sport = :$1" 2>/dev/null) ]]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# peer_wait_port PORT [SECONDS]: waits (default 10 s) until PORT listens.
peer_wait_port() {
  local deadline=$((SECONDS + ${2:-10}))
  until peer_port_busy "$1"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.05
  done
}

# peer_median NUMBER...: the median (the mean of the middle two for an even count).
peer_median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
    END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
