"""The ``mailers`` command: operators' CLI (jobs, nodes, tenants, campaigns, etcd auth).

Servers never import this package; the local development cluster it can start lives in
``mailers_dev``.
"""
