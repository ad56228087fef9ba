from tests.stack import client, processes, redis_server, settings, stack_env

__all__ = ["client", "processes", "redis_server", "settings", "stack_env"]
