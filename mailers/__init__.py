"""Mailers: the command line, the local cluster and what coordinators and nodes share."""
