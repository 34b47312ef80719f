"""The simulated exchange: a matching engine with its state in the database (SPEC §5)."""
