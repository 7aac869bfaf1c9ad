"""fdbox-qemu: run an unmodified QEMU on RAM that fdbox keeps, so the VM survives a QEMU
restart and a host kexec.

The design, in one paragraph: the guest's RAM is one memfd (or hugetlb memfd) per
``ramN`` entry of a box named after the VM. ``start`` gets those entries from fdboxd (or
creates and puts them) and execs QEMU with them inherited, as
``memory-backend-file,mem-path=/proc/self/fd/N,share=on`` (QEMU opens mem-path with
plain ``open()``, so ``/dev/fdset`` does not work here). ``suspend`` stops the guest over
QMP, turns on ``x-ignore-shared`` (and the ``cpr-reboot`` mode on QEMU >= 8.2) so the
migration stream carries only device state, migrates into a fresh memfd handed to QEMU
with ``getfd``, puts that memfd as entry ``devstate`` and quits QEMU. The next ``start``
sees ``devstate`` and runs QEMU with ``-incoming defer -S``; a helper process set up
before the exec loads the device state (``migrate-incoming fd:N``), removes ``devstate``
from the box and only then continues the guest: a failed load leaves everything in
place for another try, and a guest that ran never leaves a devstate behind it. Nothing of the guest ever touches a disk. Each ``--tap`` is a tap held
in the same box (``tap.IFNAME.qN``, recreated by fdboxd after a kexec) and handed to
QEMU as ``-netdev tap,fds=…``, so the guest keeps its network too (:mod:`.taps`).

Under systemd, ``start`` forks that helper even for a boot, and it sends ``READY=1``
once QMP says the guest runs (the template unit is ``Type=notify``). Several VMs are
suspended side by side by one process (``suspend VM...``, ``suspend --all``).
``upgrade`` replaces a running VM's QEMU: the new one starts beside it on the same RAM
and taps, and only the device state moves (:mod:`.upgrade`).

Modules: :mod:`.qmp` (the QMP client), :mod:`.vm` (one VM: start/suspend/status),
:mod:`.taps` (``--tap``), :mod:`.fleet` (several VMs: find, suspend in parallel,
list, upgrade in parallel), :mod:`.upgrade` (one VM's QEMU replaced under the running
guest), :mod:`.cli` (the ``fdbox-qemu`` command line).
"""
