"""The make targets apart from the notebooks: bench, report, shards and merge, input checks, lockfile, provenance."""
