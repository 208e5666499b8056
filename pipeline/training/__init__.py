"""Training: a trial (`trial`: spec → resolved trial, identity), its recipe (`recipes`), the engine
(`engine`), the task it trains (`tasks`, `ranking`), its record on disk (`record`), MLflow (`tracking`) and
the run that ties them (`run`: fit, Ray Train, run_trial); `cli` is `python -m pipeline train`."""
