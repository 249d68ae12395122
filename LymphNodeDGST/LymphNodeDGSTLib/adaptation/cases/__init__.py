"""Where a corrected label becomes a training case: the case library, and which CT to correct next
(ranking by uncertainty, its cache, diversity)."""
