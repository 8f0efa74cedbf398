"""What ``segvoc.report`` computes: a sweep's tables and figures, paired comparisons, the failure gallery."""
