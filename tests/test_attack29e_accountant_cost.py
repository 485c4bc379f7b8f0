"""ATTACK29E: FIX29M bounds a PRV history by its steps (500) so that "one call stays near 1 s
and a few hundred MB"; a history check_history admits must cost that, whatever its entries
and noise regime (split mode's alternating DP-SGD / smashed entries; a low sigma)."""

import subprocess
import sys
import textwrap
import time

from fedtune.privacy import DPHistory, epsilon_of
from fedtune.privacy.accounting import check_history, max_steps


def test_a_split_shaped_history_within_the_steps_bound_costs_about_a_second():
    """A split run's client history (each round one DP-SGD entry, then one smashed entry,
    never merged: 10 rounds x (25 + 25) = 500 steps, 20 entries) is accounted within 5 s."""
    history = DPHistory()
    for _ in range(10):
        history.add(1.0, 0.25, 25)  # DP-SGD
        history.add(2.0, 0.125, 25)  # the smashed data's release
    entries = tuple(history.entries)
    check_history(entries, "prv")  # admitted: 500 steps, 20 entries
    assert sum(e[2] for e in entries) == max_steps("prv")
    start = time.perf_counter()
    epsilon_of(history, 1e-5, "prv")
    took = time.perf_counter() - start
    # main: 17.7 s on the loaded 2-core box (one entry of 500 steps: 0.6 s); 50 rounds of
    # 5 + 5 steps (100 entries, preflight counts 250 steps) ran past 60 s. Composition
    # commutes: entries of one (sigma, q) could be accounted as one.
    assert took < 5.0, f"one accountant call on an admitted history took {took:.1f} s"


_LOW_SIGMA = textwrap.dedent("""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))
    from fedtune.privacy import DPHistory, epsilon_of
    from fedtune.privacy.accounting import check_history
    h = DPHistory()
    h.add(0.1, 0.01, 500)  # sigma at the PRV floor, q of 100 batches, the steps bound
    check_history(tuple(h.entries), "prv")
    print(epsilon_of(h, 1e-5, "prv"))
""")


def test_a_low_sigma_history_within_the_bounds_fits_in_a_few_gigabytes():
    """A history check_history admits (sigma 0.1, q 0.01, 500 steps: an operator's
    noise_multiplier=0.1 over 50 rounds x 10 steps) is accounted within 4 GiB of address
    space, or refused up front with a ValueError."""
    done = subprocess.run([sys.executable, "-c", _LOW_SIGMA], capture_output=True, text=True,
                          timeout=300)
    # main: MemoryError (std::bad_alloc; under a 6 GB limit it took 39 s and 4.9 GB RSS).
    assert done.returncode == 0 or "ValueError" in done.stderr, done.stderr[-400:]
