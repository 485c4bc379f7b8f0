"""Run settings whose budget stop is known, shared by the tests that read its reason."""

# Both levels, user-level DP over 3 of 3 clients (every client trains in round 1), DP-SGD
# at a given sigma of 2.5 for 2 steps: the released sample-level bound (the smallest
# partition, q 1/57) is at epsilon 0.1384 after one round and 0.14185... after two, over
# the target 0.14, so the run stops before round 2. With inline_grid.TINY.
RELEASED_BOUND_STOP = ["train.clients_per_round=3", "train.rounds=2",
                       "privacy.sample.noise_multiplier=2.5", "privacy.sample.accountant=rdp",
                       "privacy.sample.target_epsilon=0.14", "privacy.user.enabled=true",
                       "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=50",
                       "privacy.user.clipping=client"]
