#!/bin/sh
# Install what the end-to-end tests need: Postfix (postfix, postmap,
# postqueue, smtp-sink), swaks, dnsmasq and redis-server.  Run as root on Debian 12.  Idempotent:
# when everything is present it changes nothing and does not touch apt.
#
# The tests run private Postfix instances on loopback (tests/support/postfix.rs);
# the system instance must not run, so it is never started here: a
# policy-rc.d forbids service starts during the install, and the system
# instance is stopped afterwards should anything have started it anyway.
set -eu

say() { printf 'test-deps: %s\n' "$*"; }

# invoke-rc.d consults /usr/sbin/policy-rc.d; exit code 101 = action
# forbidden.  forbid_starts installs one for the length of a package
# install (keeping a policy-rc.d that was already there), allow_starts
# removes it again; the EXIT trap removes it should apt-get fail.
policy=/usr/sbin/policy-rc.d
own_policy=0
forbid_starts() {
    if [ ! -e "$policy" ]; then
        say "installing a temporary $policy that forbids service starts"
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    trap allow_starts EXIT
}
allow_starts() {
    if [ "$own_policy" -eq 1 ]; then
        say "removing the temporary $policy"
        rm -f "$policy"
        own_policy=0
    fi
    trap - EXIT
}

# Whether something listens on TCP port $1 (any address).
listeners_on() {
    if command -v ss >/dev/null 2>&1; then
        ss -Hltn "sport = :$1" 2>/dev/null || true
    elif [ -r /proc/net/tcp ]; then
        # /proc/net/tcp has the port in hex; state 0A is LISTEN.
        hex=$(printf '%04X' "$1")
        awk -v p=":$hex\$" 'NR > 1 && $2 ~ p && $4 == "0A"' /proc/net/tcp /proc/net/tcp6 2>/dev/null || true
    fi
}

missing=""
for cmd in postfix postmap postqueue smtp-sink; do
    if ! command -v "$cmd" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$cmd" ]; then
        missing="$missing $cmd"
    fi
done
if ! command -v swaks >/dev/null 2>&1; then
    missing="$missing swaks"
fi

if [ -z "$missing" ]; then
    say "postfix, postmap, postqueue, smtp-sink and swaks are installed; nothing to do"
else
    if [ "$(id -u)" -ne 0 ]; then
        say "missing:$missing; run this script as root" >&2
        exit 1
    fi
    say "missing:$missing; installing postfix and swaks"

    # "No configuration" leaves /etc/postfix/main.cf absent, so even a start
    # that slipped through would not listen on port 25.
    say "preseeding debconf: postfix/main_mailer_type = No configuration"
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections

    forbid_starts

    say "apt-get update"
    apt-get update
    say "apt-get install -y postfix swaks"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix swaks

    allow_starts
fi

# dualroute doctor's tests (tests/doctor.rs) run dnsmasq on loopback as a
# real DNS server.  dnsmasq-base ships the binary only, no system service.
if command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ]; then
    say "dnsmasq is installed; nothing to do"
else
    if [ "$(id -u)" -ne 0 ]; then
        say "missing: dnsmasq; run this script as root" >&2
        exit 1
    fi
    say "missing: dnsmasq; apt-get install -y dnsmasq-base"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dnsmasq-base
fi

# The Debian package tests (tests/deb_package.rs): lintian checks the .deb,
# systemd-analyze (package systemd) checks the unit offline, man-db lets
# `systemd-analyze verify` check the unit's man: documentation links,
# adduser and runuser (util-linux) run the maintainer scripts and the unit's
# ExecStart. cargo-deb (packaging/build-deb.sh) comes from crates.io.
deb_missing=""
command -v lintian >/dev/null 2>&1 || deb_missing="$deb_missing lintian"
command -v systemd-analyze >/dev/null 2>&1 || deb_missing="$deb_missing systemd"
command -v man >/dev/null 2>&1 || deb_missing="$deb_missing man-db"
command -v adduser >/dev/null 2>&1 || deb_missing="$deb_missing adduser"
if [ -z "$deb_missing" ]; then
    say "lintian, systemd-analyze, man and adduser are installed; nothing to do"
else
    if [ "$(id -u)" -ne 0 ]; then
        say "missing:$deb_missing; run this script as root" >&2
        exit 1
    fi
    say "missing:$deb_missing; apt-get install -y$deb_missing"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $deb_missing
fi
if cargo deb --version >/dev/null 2>&1; then
    say "cargo-deb is installed; nothing to do"
else
    say "missing: cargo-deb; cargo install cargo-deb --locked"
    cargo install cargo-deb --locked
fi

# The breaker's journal tests (tests/breaker.rs, issue 25) write journal
# files with systemd-journal-remote (from the journal export format) and
# read them with journalctl (package systemd, installed above for
# systemd-analyze). The package's systemd-journal-remote.socket is not
# started (the policy-rc.d above), and the tests never use it.
if [ -x /lib/systemd/systemd-journal-remote ] && command -v journalctl >/dev/null 2>&1; then
    say "systemd-journal-remote and journalctl are installed; nothing to do"
else
    if [ "$(id -u)" -ne 0 ]; then
        say "missing: systemd-journal-remote; run this script as root" >&2
        exit 1
    fi
    say "missing: systemd-journal-remote; apt-get install -y systemd systemd-journal-remote"
    forbid_starts
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd systemd-journal-remote
    allow_starts
fi

# The cluster tests (tests/cluster.rs, issue 24) run private redis-server
# instances on loopback ports of their own, without persistence
# (tests/support/redis.rs); they never use the system instance or 6379.
# When this script installs the package, Debian's postinst would enable
# and start the system instance: the install runs under the policy-rc.d
# above (no start), and the service is disabled afterwards, so the
# machine gets the programs and no new service. A redis-server that was
# installed before is left as it was: running or not, it is not ours.
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    say "redis-server and redis-cli are installed; nothing to install (the system instance is left as it is)"
else
    if [ "$(id -u)" -ne 0 ]; then
        say "missing: redis-server; run this script as root" >&2
        exit 1
    fi
    say "missing: redis-server; apt-get install -y redis-server"
    forbid_starts
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server
    allow_starts
    # Debian's redis.conf writes this pid file: stop the instance should
    # anything have started it despite the policy.
    redis_pidfile=/run/redis/redis-server.pid
    if [ -s "$redis_pidfile" ] && kill -0 "$(cat "$redis_pidfile")" 2>/dev/null; then
        say "the system redis-server started anyway; stopping it"
        if [ -d /run/systemd/system ]; then
            systemctl stop redis-server.service
        else
            /etc/init.d/redis-server stop
        fi
    fi
    if command -v systemctl >/dev/null 2>&1 && [ -e /lib/systemd/system/redis-server.service ]; then
        # Works without systemd as PID 1 (it edits the unit links, and the
        # SysV rc links through systemd-sysv-install).
        say "disabling the system redis-server service the install enabled"
        systemctl disable redis-server.service \
            || say "WARNING: could not disable redis-server.service; it is not running (the tests do not need it)"
    elif command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d redis-server disable \
            || say "WARNING: could not disable the redis-server init script; it is not running (the tests do not need it)"
    fi
fi

# The system instance must not run: the tests use private instances only.
if [ -f /etc/postfix/main.cf ] && /usr/sbin/postfix status >/dev/null 2>&1; then
    say "the system Postfix instance is running; stopping it"
    /usr/sbin/postfix stop
fi

# Nothing may listen on port 25 afterwards.
listeners=$(listeners_on 25)
if [ -n "$listeners" ]; then
    say "something still listens on port 25:" >&2
    printf '%s\n' "$listeners" >&2
    exit 1
fi
say "nothing listens on port 25"

say "postfix $(/usr/sbin/postconf -d -h mail_version 2>/dev/null || echo '?'), swaks $(swaks --version 2>/dev/null | head -n1 || echo '?'), $(redis-server --version 2>/dev/null | cut -d' ' -f1-3 || echo 'redis-server ?')"
say "done"
