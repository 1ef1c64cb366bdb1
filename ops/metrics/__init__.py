"""Image metrics. ``basic`` holds the reference-based pixel metrics every command records per file."""
