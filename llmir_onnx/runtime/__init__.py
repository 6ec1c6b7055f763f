"""Running partitioned models: launcher detection, communication setup, per-rank sessions."""
