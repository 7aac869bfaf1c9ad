# Shell functions for the fdbox-qemu VM stages (sourced after tests/vm/stagelib.sh).
# The inner guest is tests/qemu-guest/tick.S, built on the host into /out/tick.img.
fq() { python3 -m fdboxd.qemu --socket /run/fdbox/fdboxd.sock "$@"; }
# qemu_start VM TAG [fdbox-qemu start options] [-- extra QEMU-ARGS]: start (or resume) VM
# in the background, COM1 to /out/VM-TAG.serial, QEMU's stderr to /out/VM-TAG.log, QEMU's
# pid to /run/VM.pid.
qemu_start() {
    vm=$1 tag=$2
    shift 2
    [ -f /run/tick.img ] || cp /out/tick.img /run/tick.img
    sep=--
    for _qa in "$@"; do [ "$_qa" != -- ] || sep=; done
    fq start "$vm" "$@" $sep -accel tcg -display none -vga none -nodefaults -no-user-config \
        -drive file=/run/tick.img,format=raw,if=floppy,readonly=on \
        -serial "file:/out/$vm-$tag.serial" -monitor none > "/out/$vm-$tag.log" 2>&1 &
    echo $! > "/run/$vm.pid"
}
# wait_ticks VM TAG N: until N good ticks are on the serial port (120 s at most).
wait_ticks() {
    i=0
    while n=$(grep -c 'sum=OK' "/out/$1-$2.serial" 2>/dev/null || true); [ "${n:-0}" -lt "$3" ]; do
        i=$((i + 1))
        if [ $i -ge 600 ] || ! kill -0 "$(cat "/run/$1.pid")" 2>/dev/null; then
            log "$1: no $3 ticks"; cat "/out/$1-$2.log"; return 1
        fi
        sleep 0.2
    done
}
