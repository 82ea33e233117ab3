#!/bin/sh
# Runs inside the image's root (chroot) after its packages are installed. Changing it rebuilds the image.
set -eu

# Host keys are made at each container's first start, never shipped in the image.
rm -f /etc/ssh/ssh_host_*

cat > /etc/ssh/sshd_config.d/10-spark-lab.conf <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
CONF

sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' /etc/locale.gen
locale-gen >/dev/null
update-locale LANG=C.UTF-8

ln -sf /usr/share/zoneinfo/UTC /etc/localtime
echo UTC > /etc/timezone

# No database cluster in the image (Debian's postgresql tries to make `main` at install, and cannot in the build's
# chroot): a host's data is its own, and the prefect_server role makes the cluster where the fleet wants one.
rm -rf /etc/postgresql/*/main /var/lib/postgresql/*/main

# Each container gets its own identity at start.
: > /etc/machine-id

install -m 0755 /tmp/spark-lab-init /usr/local/sbin/spark-lab-init

apt-get clean
rm -rf /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old
