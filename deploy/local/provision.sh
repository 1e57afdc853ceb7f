#!/usr/bin/env bash
# Make sure PostgreSQL, NATS (JetStream) and Mosquitto run on this machine as plain
# local processes (no systemd, no docker), then make sure the Fieldline database exists.
# Used by `make run` and `make test`. Idempotent: when all three ports answer it is a
# quick no-op. Debian/Ubuntu only (apt-get, pg_ctlcluster, start-stop-daemon).
#
# Env: FIELDLINE_PG_DB  database to create (default: fieldline)
#      FL_MQTT_ADMIN_PASSWORD  password of the broker's account admin, set when the account
#                     file is first made (default: the development one of the Makefile)
#      FL_MQTT_CONF, FL_MQTT_PORT, FL_MQTT_STATE_DIR  another broker than the machine's
#                     (its configuration file, port and state directory; the tests use them)
#      FL_PROVISION_ONLY=mosquitto  only the broker
#      FL_PROVISION_ONLY=influxdb   only InfluxDB 1.x (installed, never started: `make bench`
#                     runs its own to compare imports and bytes a reading)
set -euo pipefail

PG_DB="${FIELDLINE_PG_DB:-fieldline}"
# The name goes into SQL below; allow only plain identifiers.
[[ $PG_DB =~ ^[A-Za-z_][A-Za-z0-9_]{0,62}$ ]] || { echo "provision: bad FIELDLINE_PG_DB '$PG_DB'" >&2; exit 1; }
PG_LOG_DIR=/var/log/postgresql
NATS_STORE=/var/lib/nats-server
NATS_LOG=/var/log/nats-server.log
MQTT_CONF="${FL_MQTT_CONF:-/etc/mosquitto/mosquitto.conf}"
MQTT_PORT="${FL_MQTT_PORT:-1883}"
[[ $MQTT_PORT =~ ^[0-9]{1,5}$ ]] || { echo "provision: bad FL_MQTT_PORT '$MQTT_PORT'" >&2; exit 1; }
MQTT_LOG=/var/log/mosquitto/mosquitto.log
WAIT_SECS=30

say() { printf 'provision: %s\n' "$*"; }
die() { printf 'provision: ERROR: %s\n' "$*" >&2; exit 1; }

# Root runs commands directly; otherwise use sudo if there is one. Without either we
# can still succeed as long as nothing needs installing or starting.
SUDO=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi
can_admin() { [[ $(id -u) -eq 0 || ${#SUDO[@]} -gt 0 ]]; }

# A TCP connect through bash's /dev/tcp; `timeout` guards against a filtered port hanging.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# apt-get update runs at most once per invocation, and only when something is missing.
APT_UPDATED=0
apt_install() {
    can_admin || die "need to install $* but not root and no sudo; install it by hand: apt-get install $*"
    command -v apt-get >/dev/null 2>&1 || die "need to install $* but apt-get is not available"
    if [[ $APT_UPDATED -eq 0 ]]; then
        say "apt-get update"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            || die "apt-get update failed"
        APT_UPDATED=1
    fi
    say "installing $*"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
        || die "apt-get install $* failed"
}

ensure_pkg() { pkg_installed "$1" || apt_install "$1"; }

# Client tools: check for the commands rather than the meta package, since e.g.
# postgresql-client-15 alone already provides psql.
ensure_cmd() { # ensure_cmd <package> <command>...
    local pkg=$1 c; shift
    for c in "$@"; do command -v "$c" >/dev/null 2>&1 || { apt_install "$pkg"; return; }; done
}

wait_for() { # wait_for <name> <log> <check command...>
    local name=$1 log=$2 i; shift 2
    for ((i = 0; i < WAIT_SECS * 2; i++)); do
        "$@" && return 0
        sleep 0.5
    done
    die "$name did not come up within ${WAIT_SECS}s; see $log"
}

# ---------------------------------------------------------------- PostgreSQL
pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

pg_version() { # newest configured cluster version, else newest installed server
    local v
    v=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $v ]] || v=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $v ]] || die "no PostgreSQL server version found under /usr/lib/postgresql"
    printf '%s' "$v"
}

# A cluster we made (or one a fresh package install made) uses Debian's default
# scram auth on TCP; the tools and tests connect as postgres over 127.0.0.1 with no
# password, so switch the loopback lines to trust, matching how this machine is set up.
pg_trust_loopback() {
    local ver=$1 hba=/etc/postgresql/$1/main/pg_hba.conf
    "${SUDO[@]}" sed -i -E \
        's#^(host[[:space:]]+all[[:space:]]+all[[:space:]]+(127\.0\.0\.1/32|::1/128)[[:space:]]+).*#\1trust#' "$hba"
    "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
}

ensure_postgres() {
    if pg_ready; then say "postgres already up on 127.0.0.1:5432"; return; fi
    local fresh=0 ver
    if ! pkg_installed postgresql; then apt_install postgresql; fresh=1; fi
    ensure_cmd postgresql-client psql pg_isready createdb
    can_admin || die "postgres is down and not root/no sudo to start it"
    ver=$(pg_version)
    if [[ ! -d /etc/postgresql/$ver/main ]]; then
        say "creating PostgreSQL $ver cluster 'main'"
        "${SUDO[@]}" pg_createcluster "$ver" main --start >/dev/null \
            || die "pg_createcluster $ver main failed"
        fresh=1
    else
        say "starting PostgreSQL $ver/main"
        "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$ver" main start \
            || die "postgres failed to start; see $PG_LOG_DIR/postgresql-$ver-main.log"
    fi
    wait_for postgres "$PG_LOG_DIR/postgresql-$ver-main.log" pg_ready
    if [[ $fresh -eq 1 ]]; then pg_trust_loopback "$ver"; fi
}

# ---------------------------------------------------------------- NATS
ensure_nats() {
    if port_open 4222; then say "nats already up on 127.0.0.1:4222"; return; fi
    ensure_pkg nats-server
    can_admin || die "nats-server is down and not root/no sudo to start it"
    say "starting nats-server (JetStream, store $NATS_STORE)"
    "${SUDO[@]}" mkdir -p "$NATS_STORE" "$(dirname "$NATS_LOG")"
    # Keep these arguments exactly as they are: a server already running on this
    # machine was started with them, and --oknodo then treats it as "already running".
    "${SUDO[@]}" start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
        -a 127.0.0.1 -p 4222 -js -sd "$NATS_STORE" -l "$NATS_LOG" \
        || die "nats-server failed to start; see $NATS_LOG"
    wait_for nats-server "$NATS_LOG" port_open 4222
}

# Prefer the monitoring endpoint when someone enabled it (-m 8222); otherwise read the
# INFO line every NATS server sends on connect, which carries "jetstream":true. If
# neither can be read, skip: the Rust services report a missing JetStream clearly.
JS_NOTE="ok (jetstream not checked)"
nats_jetstream() {
    local info=""
    if command -v curl >/dev/null 2>&1 && port_open 8222; then
        info=$(curl -fsS --max-time 3 http://127.0.0.1:8222/jsz 2>/dev/null || true)
        if [[ -n $info ]]; then
            [[ $info == *'"disabled": true'* || $info == *'"disabled":true'* ]] && return 1
            JS_NOTE="ok (jetstream)"; return 0
        fi
    fi
    info=$(timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222; IFS= read -r l <&3; printf "%s" "$l"' 2>/dev/null || true)
    [[ -z $info ]] && return 0
    [[ $info == *'"jetstream":true'* ]] || return 1
    JS_NOTE="ok (jetstream)"
}

# ---------------------------------------------------------------- Mosquitto
# The broker settings Fieldline needs, taken from deploy/mosquitto/mosquitto.conf (their one
# home, also mounted by docker-compose.yml), plus device identity: the Dynamic Security
# plugin with anonymous clients refused. Every device is a broker account that the
# device-registry manages through the plugin's admin account, made here once
# (`mosquitto_ctrl dynsec init`) with FL_MQTT_ADMIN_PASSWORD.
# Mosquitto PUBACKs a device's QoS 1 message on receipt, then drops it if ingest-mqtt's
# session already has 1000 queued (the default): under load that loses acknowledged
# readings. A larger in-flight window lets ingest-mqtt pipeline its JetStream publishes.
# max_packet_size keeps every packet within what ingest-mqtt's client reads (a larger one
# would end its connection, again on every reconnect).
# A reload (SIGHUP) did not apply them to the queues (make bench still saw drops), so a
# running broker that lacks them is stopped and started again with them; its persistence
# keeps sessions and retained messages. A running broker that has them (in the file it was
# started with, or a file that file includes, unchanged since it started) is left alone.
MQTT_TUNING_MARK="# fieldline (deploy/local/provision.sh): device identity, and do not drop what was acknowledged"
MQTT_OLD_TUNING_MARK="# fieldline (deploy/local/provision.sh): do not drop what was acknowledged"
MQTT_FIELDLINE_CONF="$(dirname "${BASH_SOURCE[0]}")/../mosquitto/mosquitto.conf"
MQTT_STATE_DIR="${FL_MQTT_STATE_DIR:-/var/lib/mosquitto}"
MQTT_ACCOUNTS="$MQTT_STATE_DIR/fieldline-dynamic-security.json"
MQTT_ADMIN_USER=fieldline-admin
MQTT_ADMIN_PASSWORD="${FL_MQTT_ADMIN_PASSWORD:-fieldline-dev-mqtt-admin-change-me}"

# The pid of the mosquitto listening on the broker's port, or nothing.
mosquitto_pid() {
    local pid
    pid=$(ss -ltnpH "sport = :$MQTT_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2 || true)
    [[ -n $pid && $(ps -o comm= -p "$pid" 2>/dev/null) == mosquitto ]] && printf '%s' "$pid"
}

# The configuration file a running mosquitto was started with (`-c FILE`), or nothing.
mosquitto_conf_of() {
    local pid=$1 previous="" arg file=""
    while IFS= read -r -d '' arg; do
        if [[ $previous == -c || $previous == --config-file ]]; then file=$arg; fi
        previous=$arg
    done < <("${SUDO[@]}" cat "/proc/$pid/cmdline" 2>/dev/null)
    [[ -n $file ]] || return 0
    [[ $file == /* ]] || file="$("${SUDO[@]}" readlink "/proc/$pid/cwd")/$file"
    printf '%s' "$file"
}

# A configuration's lines with their spaces normalised, and those of the files its
# include_dir lines name (as mosquitto reads them: *.conf).
conf_lines() {
    local file=$1 dir included
    "${SUDO[@]}" test -r "$file" || return 0
    "${SUDO[@]}" cat "$file" | sed -E 's/[[:space:]]+/ /g; s/^ //; s/ $//'
    while IFS= read -r dir; do
        for included in "$dir"/*.conf; do
            "${SUDO[@]}" test -f "$included" || continue
            "${SUDO[@]}" cat "$included" | sed -E 's/[[:space:]]+/ /g; s/^ //; s/ $//'
        done
    done < <("${SUDO[@]}" cat "$file" | awk '$1 == "include_dir" { print $2 }')
}

# Whether a configuration lacks one of the settings (or lets anonymous clients in).
conf_lacks() { # conf_lacks <file> <settings>
    local lines line
    lines=$(conf_lines "$1")
    while IFS= read -r line; do
        grep -qxF "$line" <<<"$lines" || return 0
    done <<<"$2"
    grep -qE '^allow_anonymous true$' <<<"$lines" && return 0
    return 1
}

# Whether a running mosquitto has the settings: the file it was started with has them and
# has not changed since it started.
running_with() { # running_with <pid> <settings>
    local pid=$1 conf started changed
    conf=$(mosquitto_conf_of "$pid")
    [[ -n $conf ]] || return 1
    conf_lacks "$conf" "$2" && return 1
    started=$(( $(date +%s) - $(ps -o etimes= -p "$pid" | tr -d ' ') ))
    changed=$("${SUDO[@]}" stat -c %Y "$conf") || return 1
    (( changed <= started ))
}

dynsec_plugin() {
    local candidate
    for candidate in /usr/lib/*-linux-gnu/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so; do
        [[ -f $candidate ]] && { printf '%s' "$candidate"; return 0; }
    done
    return 1
}

# The admin account of the plugin, made once; the registry creates every other account.
ensure_mqtt_accounts() {
    "${SUDO[@]}" test -f "$MQTT_ACCOUNTS" && return 0
    can_admin || die "cannot create $MQTT_ACCOUNTS (not root, no sudo)"
    say "creating the broker's account file $MQTT_ACCOUNTS (admin $MQTT_ADMIN_USER)"
    "${SUDO[@]}" mkdir -p "$MQTT_STATE_DIR"
    "${SUDO[@]}" mosquitto_ctrl dynsec init "$MQTT_ACCOUNTS" "$MQTT_ADMIN_USER" "$MQTT_ADMIN_PASSWORD" >/dev/null \
        || die "mosquitto_ctrl dynsec init failed"
    # The broker drops root for its own user, and the plugin rewrites this file on changes.
    if id mosquitto >/dev/null 2>&1; then
        "${SUDO[@]}" chown mosquitto: "$MQTT_STATE_DIR" "$MQTT_ACCOUNTS"
    fi
    "${SUDO[@]}" chmod 600 "$MQTT_ACCOUNTS"
}

tune_mosquitto() {
    [[ -f $MQTT_CONF ]] || return 0
    local settings plugin
    settings=$(grep -E '^(max_(queued|inflight)_messages|max_packet_size) ' "$MQTT_FIELDLINE_CONF") \
        || die "no max_queued_messages/max_inflight_messages/max_packet_size in $MQTT_FIELDLINE_CONF"
    [[ $settings == *max_packet_size* ]] || die "no max_packet_size in $MQTT_FIELDLINE_CONF"
    plugin=$(dynsec_plugin) || die "mosquitto_dynamic_security.so not found (Debian's mosquitto package ships it)"
    settings+=$'\n'"allow_anonymous false"$'\n'"plugin $plugin"$'\n'"plugin_opt_config_file $MQTT_ACCOUNTS"
    ensure_mqtt_accounts
    local pid="" i
    if port_open "$MQTT_PORT"; then
        pid=$(mosquitto_pid || true)
        if [[ -z $pid ]]; then
            say "warning: port $MQTT_PORT is not this machine's mosquitto; $MQTT_CONF left as it is"
            return 0
        fi
        if running_with "$pid" "$settings"; then
            say "mosquitto (pid $pid) already runs with Fieldline's settings; left alone"
            return 0
        fi
    fi
    if conf_lacks "$MQTT_CONF" "$settings"; then
        can_admin || die "cannot add Fieldline's settings to $MQTT_CONF (not root, no sudo)"
        # Any earlier values of these (an older Fieldline's included) give way to these.
        local current kept
        current=$("${SUDO[@]}" cat "$MQTT_CONF") || die "cannot read $MQTT_CONF"
        kept=$(printf '%s\n' "$current" \
            | grep -vE '^(max_(queued|inflight)_messages|max_packet_size|allow_anonymous|plugin|plugin_opt_config_file)([[:space:]]|$)' \
            | grep -vxF -e "$MQTT_TUNING_MARK" -e "$MQTT_OLD_TUNING_MARK" || true)
        say "setting Fieldline's broker settings (device identity, queues) in $MQTT_CONF"
        printf '%s\n\n%s\n%s\n' "$kept" "$MQTT_TUNING_MARK" "$settings" | "${SUDO[@]}" tee "$MQTT_CONF" >/dev/null
    fi
    # A broker started from another file, or before the file had them, restarts with it.
    [[ -n $pid ]] || return 0
    can_admin || die "mosquitto (pid $pid) lacks Fieldline's settings and cannot be restarted (not root, no sudo)"
    say "restarting mosquitto (pid $pid) to apply them"
    "${SUDO[@]}" kill "$pid" || true
    for ((i = 0; i < WAIT_SECS * 2; i++)); do
        "${SUDO[@]}" kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    die "mosquitto (pid $pid) did not stop within ${WAIT_SECS}s"
}

ensure_mosquitto() {
    port_open "$MQTT_PORT" || ensure_pkg mosquitto
    ensure_cmd mosquitto mosquitto_ctrl
    tune_mosquitto
    if port_open "$MQTT_PORT"; then say "mosquitto already up on 127.0.0.1:$MQTT_PORT"; return; fi
    can_admin || die "mosquitto is down and not root/no sudo to start it"
    say "starting mosquitto ($MQTT_CONF)"
    "${SUDO[@]}" mosquitto -d -c "$MQTT_CONF" || die "mosquitto failed to start; see $MQTT_LOG"
    wait_for mosquitto "$MQTT_LOG" port_open "$MQTT_PORT"
}

# A PyPI package at a pinned version, for the tests that check what receivers get with the
# libraries receivers use.
ensure_pip() { # ensure_pip <package> <version> <what for>
    local package=$1 version=$2
    command -v python3 >/dev/null 2>&1 || ensure_cmd python3 python3
    if python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('$package') != '$version')" 2>/dev/null; then
        return
    fi
    python3 -m pip --version >/dev/null 2>&1 || ensure_pkg python3-pip
    say "installing $package $version (PyPI) for $3"
    python3 -m pip install --quiet --disable-pip-version-check "$package==$version" 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$package==$version" \
        || die "could not install $package==$version with pip"
}

# The tests check CloudEvents bodies with the CloudEvents SDK, and the README's webhook
# receiver with the Standard Webhooks library, as receivers would.
ensure_cloudevents() {
    ensure_pip cloudevents 2.2.0 "the webhook format tests"
    ensure_pip standardwebhooks 1.1.0 "the README's webhook receiver test"
}

# The Kubernetes manifests are rendered with kustomize and checked against the Kubernetes
# schemas in the tests (tests/e2e/k8s.rs, deploy/validate-k8s.py). kustomize is not in Debian
# 12: pykustomize (PyPI) ships its Go library, called from Python. Its wheel asks for Python
# 3.14 in its metadata but is Python 3.8+ code and a native library, hence
# --ignore-requires-python (the test proves it renders). Both go into a virtualenv of their own.
PYKUSTOMIZE_VERSION=0.1.4
KUBERNETES_VALIDATE_VERSION=1.37.0
K8S_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/fieldline/k8s-venv"
ensure_k8s_tools() {
    if "$K8S_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pykustomize') != '$PYKUSTOMIZE_VERSION' or m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION')" 2>/dev/null; then
        return
    fi
    python3 -c 'import ensurepip' 2>/dev/null || ensure_pkg python3-venv
    say "installing kustomize (pykustomize $PYKUSTOMIZE_VERSION) and kubernetes-validate $KUBERNETES_VALIDATE_VERSION (PyPI) into $K8S_VENV"
    python3 -m venv "$K8S_VENV" || die "could not make the virtualenv $K8S_VENV"
    "$K8S_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --ignore-requires-python \
        "pykustomize==$PYKUSTOMIZE_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
        || die "could not install pykustomize and kubernetes-validate into $K8S_VENV"
}

# The console's browser test (tests/e2e/console.rs) drives Debian's chromium with the npm
# package playwright-core (no browser download). npm ci runs again only when the lock changed.
CONSOLE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../console" && pwd)"
ensure_console_tests() {
    ensure_cmd chromium chromium
    ensure_cmd nodejs node
    ensure_cmd npm npm
    local major
    major=$(node -p 'process.versions.node.split(".")[0]')
    ((major >= 20)) || die "node $(node --version) is too old for the console's tests (playwright-core needs 20+): install Node.js 20 or newer (e.g. NodeSource's nodejs)"
    local lock stamp="$CONSOLE_DIR/node_modules/.fieldline-lock.sha256"
    lock=$(sha256sum "$CONSOLE_DIR/package-lock.json" | cut -d' ' -f1)
    if [[ -f $stamp && $(cat "$stamp") == "$lock" ]]; then return; fi
    say "installing the console's npm packages (npm ci in console/)"
    npm ci --prefix "$CONSOLE_DIR" --no-audit --no-fund --loglevel=error >/dev/null \
        || die "npm ci in $CONSOLE_DIR failed"
    echo "$lock" >"$stamp"
}

# schemathesis and openapi-python-client, which the e2e tests run against the OpenAPI
# document (tests/e2e/openapi.rs), in a venv of their own: they pin many packages, and the
# system Python may refuse pip installs. Made once; remade when a pin changes.
PYTOOLS="${FIELDLINE_PYTOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/fieldline/pytools}"
SCHEMATHESIS_VERSION=4.32.5
OPENAPI_PYTHON_CLIENT_VERSION=0.29.1
ensure_pytools() {
    local want="schemathesis==$SCHEMATHESIS_VERSION openapi-python-client==$OPENAPI_PYTHON_CLIENT_VERSION"
    if [[ -x $PYTOOLS/bin/schemathesis && -x $PYTOOLS/bin/openapi-python-client \
          && $(cat "$PYTOOLS/.pins" 2>/dev/null) == "$want" ]]; then
        return
    fi
    python3 -c "import venv, ensurepip" 2>/dev/null || ensure_pkg python3-venv
    say "installing $want (PyPI) in $PYTOOLS for the OpenAPI tests"
    rm -rf "$PYTOOLS"
    mkdir -p "$(dirname "$PYTOOLS")"
    python3 -m venv "$PYTOOLS" || die "could not make a venv in $PYTOOLS"
    # shellcheck disable=SC2086 # two requirements, split on purpose
    "$PYTOOLS/bin/pip" install --quiet --disable-pip-version-check $want \
        || die "could not install $want with pip"
    printf '%s' "$want" >"$PYTOOLS/.pins"
}

# ---------------------------------------------------------------- main
if [[ ${FL_PROVISION_ONLY:-} == mosquitto ]]; then
    ensure_mosquitto
    exit 0
fi
if [[ ${FL_PROVISION_ONLY:-} == influxdb ]]; then
    ensure_cmd influxdb influxd
    exit 0
fi
ensure_cmd postgresql-client psql pg_isready createdb
# The README's quickstart reads ids and tokens out of answers with jq.
ensure_cmd jq jq
ensure_cloudevents
ensure_k8s_tools
ensure_console_tests
ensure_pytools
ensure_cmd mosquitto-clients mosquitto_pub mosquitto_sub
# promtool lints each service's /metrics and the alerting rules in the tests (the package's
# server is not started).
ensure_cmd prometheus promtool
ensure_postgres
ensure_nats
ensure_mosquitto

nats_jetstream || die "nats-server on 127.0.0.1:4222 runs without JetStream; restart it with -js (log: $NATS_LOG)"

# Connect over TCP as postgres: local auth is trust for 127.0.0.1 on this machine.
if [[ $(psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname='$PG_DB'") != 1 ]]; then
    say "creating database $PG_DB"
    createdb -h 127.0.0.1 -U postgres -O postgres "$PG_DB"
fi

# Grafana's read-only role on the readings (deploy/grafana/dashboards-role.sql): it grants on
# the tables that exist, so on a new database the grants come with the next provision, once
# the services have made their schemas. Trust on loopback: no password needed here.
psql -h 127.0.0.1 -U postgres -d "$PG_DB" -qX -v ON_ERROR_STOP=1 \
    -f "$(dirname "${BASH_SOURCE[0]}")/../grafana/dashboards-role.sql" >/dev/null \
    || die "creating the fieldline_dashboards role (deploy/grafana/dashboards-role.sql) failed"

printf '%-9s %-15s %s\n' postgres 127.0.0.1:5432 "ok (database $PG_DB)" \
    nats 127.0.0.1:4222 "$JS_NOTE" mosquitto 127.0.0.1:1883 "ok (dynamic security, admin $MQTT_ADMIN_USER)"
