from tests.stack import client, processes, settings, stack_env

__all__ = ["client", "processes", "settings", "stack_env"]
