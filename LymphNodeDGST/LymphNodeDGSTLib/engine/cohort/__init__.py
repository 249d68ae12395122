"""Many CTs at once: a cohort folder's cases, its parts, the batch on one or many devices,
and the cohort CSV."""
