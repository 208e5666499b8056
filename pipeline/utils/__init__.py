"""What every layer above shares: atomic writes, progress, signals, the Ray connection, the stage runner,
interval statistics."""
