"""Deployment: the same ServerApp and ClientApp on a SuperLink and real SuperNodes.

`certs` makes the TLS certificates and SuperNode keys, `supernode` starts a SuperNode with
short polling pauses, `worker` is a long-lived ClientApp process for `--isolation process`,
and `local` starts a whole deployment on one machine (tests, benchmarks, trying it out).
"""
