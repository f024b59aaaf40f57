"""What the coordinator and the sender node share at run time.

Settings declared once with their variables (``settings``), the error tree
(``errors``), etcd access and key layout (``etcd``) with the typed values one process
writes and another reads (``records``), TLS files and credentials for gRPC and etcd
(``tls``), logging (``logs``), the container health probe (``healthcheck``), and the
message model with its compiler (``message``). Imports neither server package, the CLI
nor the development tools.
"""
