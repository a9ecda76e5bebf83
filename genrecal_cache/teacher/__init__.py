"""Teacher backends: what a teacher is (`base.py`), transformers (`hf.py`) and vLLM (`vllm.py`, with its layer
hooks and the checkpoints renamed for it). Phase 1 only.
"""
