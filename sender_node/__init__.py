"""A sender node: registers itself in etcd under a lease and sends batches over SMTP.

The leader coordinator opens one ``Dispatch`` stream per node (see ``servicer.py``).
Run a node with ``python -m sender_node``; it is configured only by ``MAILER_*``
environment variables (see ``config.py``).
"""
