"""budget-alignment: multilingual reasoning alignment as a reproducible pipeline."""
