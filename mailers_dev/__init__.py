"""Development and test tools: a local cluster, a private PKI, an SMTP sink, a fault proxy.

Used by ``mailers cluster``/``mailers demo``, the tests and the benchmarks; never by a
server process.
"""
