# knack-311: sends Knack 311 activities to the ESB. The scheduler runs one container per app every few minutes:
#
#   docker run --rm --network host \
#     --env-file /etc/knack311/knack311.env \
#     -v /etc/knack311/certs:/certs:ro \
#     -v knack311-state:/app/state \
#     knack-311 data-tracker
#
# Nothing secret is in the image. Supplied at run time:
# - the env file: KNACK_APP_ID, KNACK_API_KEY, ESB_ENDPOINT (+ optional KNACK_API_URL, ESB_CA_BUNDLE, ESB_TIMEOUT,
#   ...), with ESB_CERT=/certs/esb.cert and ESB_KEY=/certs/esb.pem;
# - the certificates, mounted read-only at /certs. The container runs as uid 10001, so the key must be readable
#   by that uid: `chown 10001 esb.pem && chmod 0400 esb.pem`, or a group the operators share with mode 0440
#   and `--group-add GID` on the run line;
# - the state: STATE_DIR defaults to /app/state (state/ in the project root), where the delivery journal and the
#   run lock live. Mount a volume there, or every run forgets what it delivered and two overlapping runs do not
#   see each other's lock. A named volume takes the ownership of /app/state (uid 10001) on first use; a host
#   directory must be owned by uid 10001 (`chown 10001 /var/lib/knack311/state && chmod 0700 ...`).
#
# The app name is not defaulted: the scheduler names it (data-tracker, signs-markings); without it the program
# prints its usage and exits 2.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# A virtual environment works on the official image (python in /usr/local/bin) and on Debian-packaged Python
# (in /usr/bin, where pip may refuse to install into the system). Its python3 comes first on PATH.
COPY requirements.txt ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python3 -m pip install --no-cache-dir -r requirements.txt

# The program only; .dockerignore keeps certificates, keys, env files, state, tests and simulators out.
COPY send_esb_message.py config.py ./
COPY knack311/ knack311/
COPY templates/ templates/

RUN groupadd --gid 10001 knack311 \
 && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin knack311 \
 && mkdir -p /app/state \
 && chown 10001:10001 /app/state \
 && chmod 0700 /app/state

USER 10001:10001

ENTRYPOINT ["python3", "/app/send_esb_message.py"]
