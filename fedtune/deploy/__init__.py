"""Deployment: the same ServerApp and ClientApp on a SuperLink and real SuperNodes.

- `certs`: CA, SuperLink TLS certificate and SuperNode authentication keys;
- `supernode`: Flower's SuperNode with short polling pauses;
- `worker`: one long-lived ClientApp process per SuperNode (`--isolation process`);
- `address`: checks of addresses and files, so bad input fails at once and by name;
- `local`: a whole deployment on one machine (tests, benchmarks, `fedtune deploy local`);
- `cli`: the `fedtune deploy` commands.
"""
