#!/bin/sh
# The lab container's init (under docker --init): network set-up from the fleet, then sshd, then idle.
# Services the roles install are started by the roles (`service NAME start`); there is no systemd.
set -eu

if [ -n "${SPARK_DEFAULT_GATEWAY:-}" ]; then
    ip route replace default via "$SPARK_DEFAULT_GATEWAY"
fi

if [ "${SPARK_ROLE:-host}" = router ]; then
    # A home router: LAN hosts leave with the router's WAN address; nothing from the WAN gets in.
    wan_if=$(ip -o -4 addr show | awk -v a="$SPARK_NAT_ADDRESS" 'index($4, a "/") == 1 {print $2}')
    lan_if=$(ip -o -4 addr show | awk -v a="$SPARK_LAN_ADDRESS" 'index($4, a "/") == 1 {print $2}')
    [ -n "$wan_if" ] && [ -n "$lan_if" ] || { echo "router: interfaces not found" >&2; exit 1; }
    rule() { iptables -C "$@" 2>/dev/null || iptables -A "$@"; }
    rule POSTROUTING -t nat -s "$SPARK_NAT_SOURCE" -o "$wan_if" -j MASQUERADE
    iptables -P FORWARD DROP
    rule FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    rule FORWARD -i "$lan_if" -o "$wan_if" -j ACCEPT
    rule INPUT -i "$wan_if" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    rule INPUT -i "$wan_if" -j DROP
    echo "router ready: $SPARK_NAT_SOURCE -> $SPARK_NAT_ADDRESS via $wan_if"
    exec sleep infinity
fi

user=${SPARK_USER:-spark}
port=${SPARK_SSH_PORT:-22}
[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -A
[ -s /etc/machine-id ] || tr -d - < /proc/sys/kernel/random/uuid > /etc/machine-id
id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
echo "$user ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/spark-lab
chmod 0440 /etc/sudoers.d/spark-lab
home=$(getent passwd "$user" | cut -d: -f6)
install -d -m 0700 -o "$user" -g "$user" "$home/.ssh"
printf '%s\n' "$SPARK_AUTHORIZED_KEY" > "$home/.ssh/authorized_keys"
chown "$user:$user" "$home/.ssh/authorized_keys"
chmod 0600 "$home/.ssh/authorized_keys"
echo "Port $port" > /etc/ssh/sshd_config.d/00-spark-lab-port.conf
mkdir -p /run/sshd
# Daemonised like the init script does it, so `service ssh restart` from a role keeps the container up.
/usr/sbin/sshd
echo "host ready: sshd on port $port"
exec sleep infinity
