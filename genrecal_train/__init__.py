"""Phase 2 of GenRecal: train a student and its Recalibrator from a teacher store.

Empty until the trainer issue lands; it will import `genrecal_cache` (reader, rendering), never the reverse.
"""
