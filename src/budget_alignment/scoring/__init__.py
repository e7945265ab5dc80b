"""Answer checking, language consistency and pass@k: one implementation for metrics and rewards."""
