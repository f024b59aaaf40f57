"""The test suite.

gRPC's fork handlers are switched off before anything imports gRPC (this package is
imported before ``conftest``). Fixtures start servers with ``subprocess`` while earlier
tests' gRPC clients live in the same process, and with ``user=`` (root dropping to
``postgres``) that is a real ``fork()``. gRPC's handlers then restart its pollers in the
child before the ``exec``: one CI run lost a PostgreSQL start to a SIGSEGV that way.
Every fork here is followed by an ``exec``, which is the case gRPC's own
``doc/fork_support.md`` says to switch the handlers off for.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
