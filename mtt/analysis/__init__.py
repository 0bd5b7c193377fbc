"""Reading runs side by side: grouped comparisons with intervals and verdicts (compare), a
sweep's summary when it ends (sweeps), Optuna searches (search)."""
