"""The Varlink socket: framing (:mod:`.protocol`), methods (:mod:`.service`), server (:mod:`.server`).

The interface definition, ``io.fdbox.Store.varlink``, lives beside this file and is what
``GetInterfaceDescription`` returns.
"""

INTERFACE = "io.fdbox.Store"
SERVICE = "org.varlink.service"
