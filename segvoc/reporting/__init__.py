"""What ``segvoc.report`` and ``segvoc.bench`` compute: the report's tables and figures, and throughput."""
