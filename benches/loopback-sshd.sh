# Sourced by the benchmarks that need an sshd on 127.0.0.1 (see ../shared notes, loopback-infra).
#
# sshd_files DIR PORT: writes into DIR a host key, a client key (clientkey, clientkey.pub) allowed in
# authorized_keys, an sshd_config for 127.0.0.1:PORT (pid file DIR/sshd.pid, key logins only, the
# SFTP subsystem) and a known_hosts line for it. Start the server with `sshd -D -e -f DIR/sshd_config`
# as the user it should accept.
sshd_files() {
  local dir=$1 port=$2
  ssh-keygen -q -t ed25519 -N '' -f "$dir/hostkey"
  ssh-keygen -q -t ed25519 -N '' -f "$dir/clientkey"
  cp "$dir/clientkey.pub" "$dir/authorized_keys"
  cat >"$dir/sshd_config" <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/hostkey
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
CONF
  echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$dir/hostkey.pub")" >"$dir/known_hosts"
}
