# Shell functions for VM-tier stage scripts (sourced: `. tests/vm/stagelib.sh`).
# Stages run under /bin/sh -e with the checkout as cwd; see tests/vm/vmlib.py.
log() { echo "stage$FDBOX_VM_STAGE: $*"; }
load_module() {
    insmod "$FDBOX_VM_MODULE"
    [ -c /dev/fdbox ] || { log "no /dev/fdbox after insmod"; exit 1; }
}
start_fdboxd() {
    mkdir -p /run/fdbox /var/lib/fdbox
    python3 -m fdboxd --backend kernel --socket /run/fdbox/fdboxd.sock \
        --state-dir /var/lib/fdbox "$@" > /out/fdboxd-stage$FDBOX_VM_STAGE.log 2>&1 &
    echo $! > /run/fdboxd.pid
    i=0
    until python3 -m fdboxd.ctl --socket /run/fdbox/fdboxd.sock status > /dev/null 2>&1; do
        i=$((i + 1))
        [ $i -lt 600 ] || { log "fdboxd did not come up"; cat /out/fdboxd-stage$FDBOX_VM_STAGE.log; exit 1; }
        kill -0 "$(cat /run/fdboxd.pid)" 2>/dev/null || { log "fdboxd died"; cat /out/fdboxd-stage$FDBOX_VM_STAGE.log; exit 1; }
        sleep 0.5
    done
}
stop_fdboxd() {
    kill -TERM "$(cat /run/fdboxd.pid)"
    while kill -0 "$(cat /run/fdboxd.pid)" 2>/dev/null; do sleep 0.2; done
}
ctl() { python3 -m fdboxd.ctl --socket /run/fdbox/fdboxd.sock "$@"; }
vmm() { python3 contrib/vmm/standin-vmm --socket /run/fdbox/fdboxd.sock "$@"; }
now() { cut -d' ' -f1 /proc/uptime; }
