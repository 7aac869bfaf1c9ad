"""fdbox: keep VM guest-memory file descriptors alive, by name, across VMM restarts and kexec.

The package is laid out one concept a module:

- :mod:`fdboxd.errors`   the one exception class and the error names every front-end speaks
- :mod:`fdboxd.names`    box and entry name rules
- :mod:`fdboxd.fdtypes`  what kind of file an fd really is (never trust the client)
- :mod:`fdboxd.model`    boxes, entries, states, callers
- :mod:`fdboxd.store`    the core: rules, ownership, limits, counters, events (no fd kind named)
- :mod:`fdboxd.kinds`    one contract per fd kind (memfd, guest_memfd, tap), registered once;
  :mod:`fdboxd.kinds.base` the contract and the store surface the layers above may use
- :mod:`fdboxd.lifecycle` seal, carry across kexec, verify, unseal, finish: loops over entries
- :mod:`fdboxd.reconcile` start-up: the backends say what exists, the manifest who owns it
- :mod:`fdboxd.preflight` before a kexec: would every entry cross? Loops over entries and asks
  each kind (:meth:`fdboxd.kinds.Kind.preflight`), then sums the room they need (no fd kind named);
  :mod:`fdboxd.hostfacts` the host facts it reads
- :mod:`fdboxd.gmem` / :mod:`fdboxd.net` the mechanics behind two kinds: copying a
  guest_memfd without touching it, recording and recreating a tap
- :mod:`fdboxd.manifest` the on-disk record of names, owners and types (snapshot + journal)
- :mod:`fdboxd.backends` where the file references actually live (memory, kernel, LUO)
- :mod:`fdboxd.uapi` / :mod:`fdboxd.uapi_luo` the ioctl tables of ``/dev/fdbox`` and
  ``/dev/liveupdate`` (mirrors of the C headers, checked against them);
  :mod:`fdboxd.ownedfd` the one-fd lifetime their wrappers share
- :mod:`fdboxd.service`  the operations and their rules, once for every front-end
- :mod:`fdboxd.varlink`  the socket protocol (framing) and server; :mod:`fdboxd.dbus` the
  D-Bus front-end: both thin, over :mod:`fdboxd.service`
- :mod:`fdboxd.client`   the client library used by fdboxctl and integrators
- :mod:`fdboxd.failpoints` named failpoints (``FDBOX_FAILPOINTS``), the one list the crash matrix walks
"""

__version__ = "0.1.0"
