"""Training of DSpark / DFlash drafts (spec §9) and plain next-token training of a Qwen3 target."""
