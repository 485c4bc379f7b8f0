"""The names of split mode's round figures, without the code that computes them: the
ledger's release split (`fedtune.run.curator_log`) reads them at config time, before torch
or Flower may be imported (`fedtune.split.ledger_fields` computes them and imports both).
"""

# Round keys that count, sum or average over the clients that trained (the secret cohort
# under user-level DP). `split_privacy` is the config's statement, the same every round.
COHORT_FIGURES = ("smashed_bytes_up", "smashed_bytes_down", "probe_bytes", "delta_bytes_up",
                  "delta_bytes_down", "total_bytes", "server_flops",
                  "client_flops_per_example", "full_model_flops_per_example",
                  "client_flops_fraction", "split_steps", "local_loss_steps")
RELEASE_SAFE = ("split_privacy",)
# Why summary.json's split totals are null (a user-level release).
NULL_TOTALS_NOTE = ("null: sums over the secret cohort (privacy.user, log_cohorts = false); "
                    "each round's figures are in the curator's log")
