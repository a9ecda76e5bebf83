"""Phase 2 of GenRecal: train a student and its Recalibrator from a teacher store (`train-student`), and score
students (`eval-student`). Imports `genrecal_cache` (the store reader, rendering, model loading), never the reverse.
"""
