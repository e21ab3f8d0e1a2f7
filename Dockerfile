# knack-311: sends Knack 311 activities to the ESB. The scheduler runs one container per app every few minutes:
#
#   docker run --rm --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
#     --env-file /etc/knack-311/data-tracker.env \
#     -v /etc/knack-311/certs:/certs:ro \
#     -v knack-311-state:/app/state \
#     knack-311 data-tracker
#
# Nothing secret is in the image. Supplied at run time:
# - the env file: KNACK_APP_ID, KNACK_API_KEY, ESB_ENDPOINT (+ optional KNACK_API_URL, ESB_CA_BUNDLE, ESB_TIMEOUT,
#   ...), with ESB_CERT=/certs/esb.cert and ESB_KEY=/certs/esb.pem;
# - the certificates, mounted read-only at /certs. The container runs as uid 10001, so the key must be readable
#   by that uid: `chown 10001 esb.pem && chmod 0400 esb.pem`, or a group the operators share with mode 0440
#   and `--group-add GID` on the run line;
# - the state: STATE_DIR defaults to /app/state (state/ in the project root), where the delivery journal and the
#   run lock live. Mount the knack-311-state volume there, or every run forgets what it delivered (and may send
#   a message twice) and two overlapping runs do not see each other's lock. A named volume takes the ownership
#   of /app/state (uid 10001) on first use; a host directory must be owned by uid 10001
#   (`chown 10001 /var/lib/knack-311/state && chmod 0700 /var/lib/knack-311/state`).
#
# The program needs no capability and writes only to /app/state: --read-only, --cap-drop ALL and
# --security-opt no-new-privileges work (make docker-smoke runs it that way). The tmpfs on /tmp is where SQLite
# puts a scratch file should the journal ever need one. `docker stop` gives the container 10 s after SIGTERM
# before SIGKILL; the program ends within 8 s of SIGTERM, so the default is enough (never pass a lower -t).
#
# The app name is not defaulted: the scheduler names it (data-tracker, signs-markings); without it the program
# prints its usage and exits 2. The seed's command works too: a checkout with its esb.cert and esb.pem mounted over
# /app, `docker run --rm --env-file env_file -v "$(pwd)":/app knack-311 python send_esb_message.py data-tracker`
# (the venv is in /opt/venv, outside the mount; `python` on PATH is the venv's). uid 10001 must be able to read
# the key and write state/ there, or the run is `--user "$(id -u):$(id -g)"`; the program says which, exit 2.

# --- builder: the virtual environment with the pinned requirements -------------------------------------------
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A virtual environment works on the official image (python in /usr/local/bin) and on Debian-packaged Python
# (in /usr/bin, where pip may refuse to install into the system). Once the requirements are in, the venv's
# own pip, setuptools and wheel go: nothing installs anything at run time.
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python3 -m pip install -r /tmp/requirements.txt \
 && /opt/venv/bin/python3 -m pip uninstall --yes pip setuptools wheel \
 && if /opt/venv/bin/python3 -m pip --version >/dev/null 2>&1; then echo "pip left in the venv" >&2; exit 1; fi

# --- runtime: the base interpreter, the venv and the program only -----------------------------------------------
FROM python:3.11-slim

# The venv has no pip (above), and the base image's own pip, setuptools and wheel are deleted here too, with
# ensurepip and its bundled wheels, so no interpreter in the image can install a package: not `python -m pip`
# (the venv's, first on PATH) and not the base interpreter's. Both layouts are covered: the official image
# keeps them in /usr/local/lib/python3.11/site-packages and /usr/local/bin, Debian's Python in
# /usr/lib/python3/dist-packages, /usr/bin and /usr/share/python-wheels.
RUN set -eu; \
    for dir in $(python3 -c 'import site, sysconfig; print(*site.getsitepackages(), sysconfig.get_path("stdlib"))'); do \
        rm -rf "$dir"/pip "$dir"/pip-*-info "$dir"/setuptools "$dir"/setuptools-*-info \
               "$dir"/wheel "$dir"/wheel-*-info "$dir"/pkg_resources "$dir"/_distutils_hack \
               "$dir"/distutils-precedence.pth "$dir"/ensurepip; \
    done; \
    rm -rf /usr/share/python-wheels /usr/local/bin/pip /usr/local/bin/pip3* /usr/local/bin/wheel \
           /usr/bin/pip /usr/bin/pip3*; \
    if python3 -m pip --version >/dev/null 2>&1; then echo "the base image's pip is still importable" >&2; exit 1; fi

COPY --from=builder /opt/venv /opt/venv

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# The program only; .dockerignore keeps certificates, keys, env files, state, tests and simulators out.
COPY send_esb_message.py config.py ./
COPY knack311/ knack311/
COPY templates/ templates/
# Outside /app, so that a checkout mounted over /app (the seed's command) does not hide it.
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh \
 && groupadd --gid 10001 knack311 \
 && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin knack311 \
 && mkdir -p /app/state \
 && chown 10001:10001 /app/state \
 && chmod 0700 /app/state

USER 10001:10001

# An app name or an option goes to the program (IMAGE data-tracker, IMAGE --check data-tracker, IMAGE --version);
# any other command runs as given (IMAGE python send_esb_message.py data-tracker, IMAGE bash). See the script.
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]

# Last, so that a new revision or build time does not rebuild the layers above.
# docker build --build-arg REVISION=$(git rev-parse HEAD) --build-arg VERSION=... \
#   --build-arg CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ) -t knack-311 .
# SOURCE: where this image's code lives (the repository URL); this checkout names no remote, so the build says it.
ARG SOURCE=unknown
ARG REVISION=unknown
ARG VERSION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="knack-311" \
      org.opencontainers.image.description="Sends Knack 311 activity records to the city's ESB (SOAP over mutual TLS), then marks them SENT in Knack" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.created="$CREATED"
# --version reads these: the image has no .git to ask
ENV KNACK311_VERSION="$VERSION" \
    KNACK311_REVISION="$REVISION"
