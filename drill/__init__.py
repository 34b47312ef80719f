"""The HA and chaos drill (SPEC §9, `make drill`): the whole system on PostgreSQL under faults, then its invariants."""
