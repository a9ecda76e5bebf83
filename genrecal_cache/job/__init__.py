"""The `cache-teacher` job: its config, one writer's run over its shard, and the launchers that run copies of it
(data-parallel subprocesses, Ray tasks). The top of phase 1, below only the CLI; phase 2 never imports it.
"""
