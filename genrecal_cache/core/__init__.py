"""The bottom layer, shared by both phases: errors, fault injection, typed configs and `--config` files, the
console-app runner, model and processor loading, and processes that die with their parent. Imports nothing above.
"""
