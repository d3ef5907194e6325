#!/usr/bin/env bash
# Starts a headless PulseAudio daemon with a 24 kHz mono null sink ("vsink") whose monitor is the
# default source, so PortAudio sees a working full-duplex device with no sound card.
# Usage: eval "$(bash scripts/pulse.sh start)"   (prints the XDG_RUNTIME_DIR export, and
#                                                PERSONAPLEX_PULSE_STARTED=1 when it started the daemon)
#        bash scripts/pulse.sh stop              (stops the daemon of that XDG_RUNTIME_DIR)
set -euo pipefail
export XDG_RUNTIME_DIR=${PULSE_RUNTIME_DIR:-/tmp/personaplex-pulse}
case "${1:-start}" in
stop)
    pulseaudio --kill 2>/dev/null || true
    exit 0 ;;
start)
    mkdir -p -m 700 "$XDG_RUNTIME_DIR"
    started=0
    if ! pactl info >/dev/null 2>&1; then
        started=1
        cat > "$XDG_RUNTIME_DIR/ci.pa" <<'PA'
load-module module-native-protocol-unix auth-anonymous=1
load-module module-null-sink sink_name=vsink rate=24000 channels=1 sink_properties=device.description=VirtualSink
load-module module-null-sink sink_name=ka_sink rate=24000 channels=1
load-module module-loopback source=vsink.monitor sink=ka_sink latency_msec=10 source_dont_move=true sink_dont_move=true
set-default-sink vsink
set-default-source vsink.monitor
PA
        pulseaudio -n -F "$XDG_RUNTIME_DIR/ci.pa" -D --exit-idle-time=-1 \
            --log-target=file:"$XDG_RUNTIME_DIR/pulse.log" >/dev/null 2>&1
        for _ in $(seq 100); do pactl info >/dev/null 2>&1 && break; sleep 0.05; done
        # The idle null sink starts with a ~2 s period; wait until the keep-alive loopback made it low-latency.
        for _ in $(seq 60); do
            lat=$(LC_ALL=C pactl list sinks | awk '/Name: vsink$/{f=1} f&&/^[[:space:]]*Latency:/{print $2; exit}')
            [ -n "$lat" ] && [ "$lat" -lt 100000 ] 2>/dev/null && break
            sleep 0.1
        done
    fi
    echo "export XDG_RUNTIME_DIR=$XDG_RUNTIME_DIR"
    [ $started = 1 ] && echo "export PERSONAPLEX_PULSE_STARTED=1"
    exit 0 ;;
esac
