"""The one place where fedtune touches private members of its dependencies.

Everything else uses Flower, Ray and Opacus through their public API only;
tests/test_public_api.py reads the source of fedtune/, clients/, strategies/ and benchmarks/
and fails on a private import or attribute of theirs anywhere outside this package.

One module per dependency (`flower_sim`, `flower_deploy`, ...). Each patch in it:

- checks the installed version against the range it was written for,
- falls back to a public way (or fails with a one-line error naming the version) outside
  that range, never silently,
- has a test of its own.

Opacus needs no module here: `PrivateTraining.close` strips the hooks with the public
`to_standard_module`, and accounting restores an accountant's history with its public
`load_state_dict`.
"""
