"""A module that starts a thread as it is imported, as a few libraries do; importing it makes
forking the importing process unsafe (see :func:`workers.zygote.fork_hazard`)."""

import threading

_stop = threading.Event()
THREAD = threading.Thread(target=_stop.wait, name="started-at-import", daemon=True)
THREAD.start()
