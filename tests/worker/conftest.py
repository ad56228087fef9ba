from tests.stack import client, processes, settings, stack_env, thread_workers

__all__ = ["client", "processes", "settings", "stack_env", "thread_workers"]
