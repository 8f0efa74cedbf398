"""The safety rules, each in one place: what segvoc may delete (ownership), who may write a run directory (run
lock), and which ``_target_`` a config read from a file may name (trust)."""
