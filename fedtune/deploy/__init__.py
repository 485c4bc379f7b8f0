"""Deployment: the same ServerApp and ClientApp on a SuperLink and real SuperNodes.

- `certs`: CA, SuperLink TLS certificate and SuperNode authentication keys;
- `fleet_gateway`: the one port that faces the network, forwarding only the Fleet API to a
  SuperLink that listens on loopback;
- `seeded_noise`: deployments refuse `privacy.reproducible_noise`;
- `supernode`: Flower's SuperNode with short polling pauses;
- `worker`: one long-lived ClientApp process per SuperNode (`--isolation process`);
- `address`: checks of addresses and files, so bad input fails at once and by name;
- `local`: a whole deployment on one machine (tests, benchmarks, `fedtune deploy local`);
- `cli`: the `fedtune deploy` commands (`superlink` starts the SuperLink and its gateway).
"""
