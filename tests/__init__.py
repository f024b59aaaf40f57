"""The test suite.

gRPC's fork handlers are switched off before anything imports gRPC (this package is
imported before ``conftest``). Every process the suite starts is started with
``subprocess`` and ``exec``s at once, the case gRPC's own ``doc/fork_support.md`` says to
switch the handlers off for. ``mailers_dev.procs`` already starts them with ``vfork``
(no handlers run); this keeps a real ``fork()``, should a later fixture cause one, from
restarting gRPC's pollers in the child: one CI run lost a PostgreSQL start to a SIGSEGV
that way, when PostgreSQL was still started with ``subprocess``'s ``user=``.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
