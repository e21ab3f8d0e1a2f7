#!/bin/sh
# knack-311's entrypoint, in the convention of the official images (postgres, redis):
#   IMAGE data-tracker [options], IMAGE --check data-tracker, IMAGE --version, IMAGE (no argument: the usage)
#       an app of config.py or an option: the arguments go to the program;
#   IMAGE python send_esb_message.py data-tracker, IMAGE bash, IMAGE sh -c '...'
#       anything else runs as given (the command the city's scheduler already has keeps working).
# Either way through `exec`, so that what runs is PID 1 and gets docker stop's SIGTERM itself.
set -eu

# the image's layout; the tests point them at a checkout
PYTHON="${KNACK311_PYTHON:-/opt/venv/bin/python}"
APP_DIR="${KNACK311_APP_DIR:-/app}"
PROGRAM="$APP_DIR/send_esb_message.py"

# Whether $1 is a key of CONFIG in the config.py that will run: read at run time, so that a checkout mounted over
# /app brings its own apps. A config.py that cannot be loaded answers no; the program then says what is wrong.
is_app() {
    "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from config import CONFIG; sys.exit(sys.argv[2] not in CONFIG)' \
        "$APP_DIR" "$1" 2>/dev/null
}

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- "$PYTHON" "$PROGRAM" "$@"
elif ! command -v "$1" >/dev/null 2>&1 || is_app "$1"; then
    # an app, or a word that is no command either (a mistyped app): the program names the apps it knows
    set -- "$PYTHON" "$PROGRAM" "$@"
fi
exec "$@"
