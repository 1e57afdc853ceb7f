# The commands a newcomer types. `make run` and `make test` provision PostgreSQL, NATS
# (JetStream) and Mosquitto on this machine first (deploy/local/provision.sh).

CARGO        ?= cargo
# FIELDLINE_BOOTSTRAP_ADMIN_KEY sets the platform admin key on first start of an empty
# registry (local development only; production leaves it unset and stores the printed key).
DEV_ADMIN_KEY ?= flk_dev_admin_key_change_me
# The broker's account admin (made by provisioning), ingest-mqtt's own broker account (made by
# the registry), and the key device tokens derive from: development values, change them for
# anything else (docs/decisions/2026-12-04-device-identity-on-the-broker.md).
DEV_MQTT_ADMIN_PASSWORD ?= fieldline-dev-mqtt-admin-change-me
DEV_MQTT_INGEST_PASSWORD ?= fieldline-dev-mqtt-ingest-change-me
DEV_DEVICE_TOKEN_KEY ?= fieldline-dev-device-token-key-change-me

.PHONY: help provision build run test bench bench-quick chaos soak lint fmt clean-test-data console console-shots

help:
	@echo "make run     provision the servers, build, and serve every service on http://127.0.0.1:8080"
	@echo "make test    provision the servers and run every test against them"
	@echo "make bench   release build, every benchmark scenario beside the machine's raw limits -> bench/report.md"
	@echo "make chaos   the fault suite: kill each service and server under load, count what is lost -> chaos/report.md"
	@echo "make soak    30 minutes of steady load: memory and table sizes at the start and the end -> chaos/soak.md"
	@echo "make console rebuild the console bundle (console/dist, committed) from console/src with npm"
	@echo "make lint    clippy with warnings as errors, rustfmt check"
	@echo "make fmt     format the code"

# Not FIELDLINE_*: the services refuse settings they do not know.
provision:
	@FL_MQTT_ADMIN_PASSWORD='$(DEV_MQTT_ADMIN_PASSWORD)' bash deploy/local/provision.sh

# fieldline_build_info{commit} shows this (not FIELDLINE_*: the services refuse unknown settings).
FL_BUILD_COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
export FL_BUILD_COMMIT

build:
	$(CARGO) build --locked --bin fieldline

run: provision build
	@echo
	@echo "Fieldline on http://127.0.0.1:8080  (admin key: $(DEV_ADMIN_KEY))"
	@echo "  Console: http://127.0.0.1:8080/ (sign in with the admin key)"
	@echo "  MQTT: mosquitto_pub -h 127.0.0.1 -i fl/default/<device> -u fl/default/<device> -P <its token> -t 'fl/default/<device>/telemetry' ..."
	@echo "  Quickstart: README.md; Ctrl-C stops."
	@echo
	FIELDLINE_BOOTSTRAP_ADMIN_KEY=$${FIELDLINE_BOOTSTRAP_ADMIN_KEY:-$(DEV_ADMIN_KEY)} \
	FIELDLINE_LOG_FORMAT=$${FIELDLINE_LOG_FORMAT:-text} \
	FIELDLINE_WEBHOOK_ALLOW_PRIVATE=$${FIELDLINE_WEBHOOK_ALLOW_PRIVATE:-true} \
	FIELDLINE_MQTT_URL=$${FIELDLINE_MQTT_URL:-mqtt://fieldline-ingest:$(DEV_MQTT_INGEST_PASSWORD)@127.0.0.1:1883} \
	FIELDLINE_MQTT_ADMIN_URL=$${FIELDLINE_MQTT_ADMIN_URL:-mqtt://fieldline-admin:$(DEV_MQTT_ADMIN_PASSWORD)@127.0.0.1:1883} \
	FIELDLINE_DEVICE_TOKEN_KEY=$${FIELDLINE_DEVICE_TOKEN_KEY:-$(DEV_DEVICE_TOKEN_KEY)} \
	$(CARGO) run --locked --quiet --bin fieldline -- serve --services all

# The end-to-end tests start the real binary, so it is built first. The quick bench runs once
# at the end so the harness cannot rot (it checks that figures are produced, not their size);
# so does the quick fault suite (kill -9 of query-api and of NATS), which fails if an
# acknowledged reading is lost.
test: provision
	$(CARGO) build --locked -p fieldline -p loadgen
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --workspace; \
	else \
		$(CARGO) test --locked --workspace; \
	fi
	$(CARGO) run --locked --quiet -p loadgen --bin loadgen -- bench --quick --out target/bench-quick
	$(CARGO) run --locked --quiet -p loadgen --bin loadgen -- chaos --quick --out target/chaos-quick

# The console's bundle is committed (console/dist, embedded in the binary), so building needs
# no npm; this rebuilds it after a change in console/ (Node.js 20.19+). A test
# (fieldline-console) fails when dist was not rebuilt from the sources as they are.
console:
	npm ci --prefix console --no-audit --no-fund
	npm --prefix console run build

# The browser test with screenshots of each page into docs/console/ (the README shows them)
# and the device page's load time with a week of 10-second readings (printed).
console-shots: provision
	$(CARGO) build --locked -p fieldline
	FL_CONSOLE_SHOTS_DIR=$(CURDIR)/docs/console FL_CONSOLE_MEASURE=1 \
		$(CARGO) test --locked -p fieldline --test e2e the_console -- --nocapture

# Figures worth comparing: release build, 20 s per scenario, on a nats-server of the bench's own
# (so its CPU per reading is measured too). Each figure beside its raw limit, ratio and target,
# and the ingest-scaling curve (1, 2, 4 processes). Writes bench/report.{md,json}. InfluxDB 1.x
# is installed (not started) for the storage scenario, which runs its own beside Fieldline.
bench: provision
	@FL_PROVISION_ONLY=influxdb bash deploy/local/provision.sh
	$(CARGO) build --locked --release -p fieldline -p loadgen
	$(CARGO) run --locked --release --quiet -p loadgen --bin loadgen -- bench --private-nats --out bench

# Every scenario for a few seconds on the debug build.
bench-quick: provision
	$(CARGO) build --locked -p fieldline -p loadgen
	$(CARGO) run --locked --quiet -p loadgen --bin loadgen -- bench --quick --out target/bench-quick

# The fault suite on its own PostgreSQL, NATS and Mosquitto (it kills them; provisioning only
# installs them), one process per service. Writes chaos/report.{md,json}; the services' logs
# go to chaos/logs/ (not committed).
chaos: provision
	$(CARGO) build --locked --release -p fieldline -p loadgen
	$(CARGO) run --locked --release --quiet -p loadgen --bin loadgen -- chaos --out chaos

SOAK_MINUTES ?= 30
soak: provision
	$(CARGO) build --locked --release -p fieldline -p loadgen
	$(CARGO) run --locked --release --quiet -p loadgen --bin loadgen -- soak --minutes $(SOAK_MINUTES) --out chaos

lint:
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all --check

fmt:
	$(CARGO) fmt --all

# Tests drop their database when they pass; a failed test leaves fl_test_* behind for a look.
clean-test-data:
	@psql -h 127.0.0.1 -U postgres -tAc "select datname from pg_database where datname like 'fl_test_%'" \
		| xargs -r -I{} psql -h 127.0.0.1 -U postgres -qc 'DROP DATABASE "{}" WITH (FORCE)'
