# Frontdoor. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8000
# One web process on the embedded default: without Redis each process keeps its own breaker
# state, and the demo in the README is easier to follow with one. Set REDIS_URL to share it.
WEB_CONCURRENCY ?= 1

export FLASK_APP := app

.DEFAULT_GOAL := help
.PHONY: help install lock run migrate test test-fast browser htmx lint bench bench-jobs bench-cache bench-webhooks clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

# Installs come from the lock: requirements-dev.txt pins every package (requirements.txt's runtime
# set and the dev tools), then the gateway itself goes in editable with nothing more. pip check
# fails the install when a pin no longer fits setup.cfg's bounds: run make lock.
$(STAMP): requirements.txt requirements-dev.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP) ## create the virtualenv and install the locked dependencies, dev tools and the gateway

# The lock is solved for Python 3.11 on Linux by pip-tools, in a virtualenv of its own (inside
# $(VENV), so make clean and .gitignore cover it) that keeps its pip and click apart from the
# locked set. A pin that still fits setup.cfg's bounds is kept; UPGRADE=1 re-solves to the newest.
LOCK_TOOLS  := pip==26.3 pip-tools==7.6.2
LOCK_VENV   := $(VENV)/lock-tools
PIP_COMPILE := $(LOCK_VENV)/bin/pip-compile --quiet $(if $(UPGRADE),--upgrade )--strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host
lock: ## re-solve requirements.txt (runtime) and requirements-dev.txt from setup.cfg's bounds (UPGRADE=1: newest)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "make lock: the lock is for Python 3.11")'
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet $(LOCK_TOOLS)
	$(PIP_COMPILE) --output-file=requirements.txt setup.cfg
	$(PIP_COMPILE) --extra=dev --extra=demo --extra=otel --constraint=requirements.txt --output-file=requirements-dev.txt setup.cfg

migrate: $(STAMP) ## apply database migrations (SQLite under instance/ unless DATABASE_URL is set)
	$(BIN)/flask db upgrade

# The demo lets webhook receivers be http:// on this machine (httpbin plays one); the SSRF guard
# refuses both by default. Web and worker count metrics into one fresh directory, so the web's
# /metrics shows the jobs and webhooks too.
run: migrate ## start web, worker, beat and an httpbin demo upstream on the embedded default (port $(PORT))
	rm -rf instance/metrics && mkdir -p instance/metrics
	HOST=127.0.0.1 WEB_CONCURRENCY=$(WEB_CONCURRENCY) PATH="$(CURDIR)/$(BIN):$$PATH" \
	PROMETHEUS_MULTIPROC_DIR="$(CURDIR)/instance/metrics" \
	GATEWAY_WEBHOOK_ALLOW_HTTP=true GATEWAY_WEBHOOK_ALLOWED_NETWORKS='["127.0.0.0/8"]' \
	$(BIN)/honcho start -f Procfile.dev -p $(PORT)

# Three pytest-xdist workers: the integration tests run in two serial groups, each on a worker of
# its own, and the unit tests share out the third (tests/conftest.py). TEST_WORKERS=2: one serial
# group beside the unit tests; TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 3
test: $(STAMP) browser ## run the whole suite (integration tests included; they need Redis/Postgres or local binaries)
	$(BIN)/pytest -n $(TEST_WORKERS)

# The browser tests drive Debian's chromium through Debian's chromium-driver (Selenium downloads
# nothing): installed with apt when missing, as root or through sudo.
BROWSER_PACKAGES := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: ## install Debian's chromium and chromium-driver for the browser tests, when missing
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BROWSER_PACKAGES); }

# The portal's htmx, as the npm registry publishes it (no build step); the version is noted in
# app/portal/web.py (HTMX_VERSION) and the README, and a test checks the file carries it.
HTMX_VERSION := 2.0.11
htmx: ## fetch htmx.min.js (npm package htmx.org) into app/portal/static
	cd $$(mktemp -d) && npm pack --silent htmx.org@$(HTMX_VERSION) && tar xzf htmx.org-$(HTMX_VERSION).tgz && \
	  cp package/dist/htmx.min.js $(CURDIR)/app/portal/static/htmx.min.js && cp package/LICENSE $(CURDIR)/app/portal/static/htmx.LICENSE

test-fast: $(STAMP) ## run the suite without the slow end-to-end tests
	$(BIN)/pytest -n $(TEST_WORKERS) -m 'not slow'

lint: $(STAMP) ## ruff over the code and tests
	$(BIN)/ruff check app tasks tests bench

bench: $(STAMP) ## pass-through benchmark: the gateway against a naive Flask proxy (needs wrk)
	$(BIN)/python bench/proxy.py

bench-jobs: $(STAMP) ## async jobs benchmark: a mode: async route against celery send_task + a row (needs wrk, Redis)
	$(BIN)/python bench/jobs.py

bench-cache: $(STAMP) ## cache and aggregate benchmark: a cache hit against a Flask hello-world, three 50 ms backends merged (needs wrk; Redis optional)
	$(BIN)/python bench/cache.py

bench-webhooks: $(STAMP) ## webhook deliveries/s to a local receiver, one worker: the gateway against a naive requests.post task (needs Redis)
	$(BIN)/python bench/webhooks.py

clean: ## remove the virtualenv and local state
	rm -rf $(VENV) instance .pytest_cache .coverage
